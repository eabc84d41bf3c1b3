"""The training loop: exact resume, periodic eval, best-model export, NaN guard, progress.

`fit` drives an already-built train step over a deterministic batch stream:

    result = fit(state, train_step, eval_step, teacher_variables, stream, options, workdir)

- Checkpoints: an Orbax `CheckpointManager` under `workdir/checkpoints` saves the whole
  `TrainState` every `checkpoint_every` steps and at the end, and on start restores the latest
  one. The batch stream is a pure function of the step (see `kdflax.data`), and the state holds
  the PRNG key, so a run killed at any point and restarted ends bit-identical to an
  uninterrupted run.
- Eval every `eval_every` steps and at the end; when val top-1 improves the model is written to
  `workdir/model_best` (a model directory, see `kdflax.train.checkpoint`), and the last one to
  `workdir/model_final`.
- NaN/Inf guard: metrics are checked every `log_every` steps and before every checkpoint; a
  non-finite loss stops the run with `NonFiniteLossError` and leaves the last good checkpoint.
- Metrics: `workdir/metrics.jsonl` and TensorBoard, written by process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kdflax import atomic
from kdflax.train import checkpoint as model_io
from kdflax.train.checkpoint import BEST_MODEL_DIR, FINAL_MODEL_DIR, ModelInfo
from kdflax.train.metrics import MetricWriter, truncate_metrics
from kdflax.train.state import TrainState
from kdflax.train.step import batch_sharding

CHECKPOINT_DIR = 'checkpoints'
RESULTS_FILE = 'results.json'


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class CheckpointRestoreError(RuntimeError):
  """The checkpoint to resume from cannot be read; nothing was changed."""


class CheckpointSaveError(RuntimeError):
  """An (asynchronous) checkpoint save failed, e.g. on a full disk; earlier ones are kept."""


def committed_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints under `workdir/checkpoints` whose save completed (Orbax writes
  `STEP.orbax-checkpoint-tmp` and renames it to `STEP` when the save commits)."""
  folder = os.path.join(workdir, CHECKPOINT_DIR)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(name) for name in names if name.isdigit())


def _root_cause(error: BaseException) -> str:
  """The innermost `__cause__` of `error` on one line (TensorStore's own error says what is
  wrong; Orbax wraps it). A TensorStore error that carries an OS error code is reduced to that
  error (`No space left on device`), not its page-long store spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, OSError) and error.strerror:
    return atomic.os_error_line(error)
  text = ' '.join(str(error).split())
  os_code = re.search(r"\[os_error_code='(\d+)'\]", text)
  if os_code:
    return os.strerror(int(os_code.group(1)))
  return text[:240] or type(error).__name__


def _save_failure(run: _Run, step: int, error: BaseException,
                  what: str = 'a checkpoint', where: str = CHECKPOINT_DIR
                  ) -> CheckpointSaveError:
  done = committed_steps(run.workdir)
  kept = (f'the last committed checkpoint (step {done[-1]}) is kept' if done else
          'no checkpoint was committed (a re-run starts from step 0)')
  cause = _root_cause(error)
  return CheckpointSaveError(f'saving {what} in {os.path.join(run.workdir, where)} '
                             f'failed: {cause}; stopped at step {step}, {kept}')


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How long to train and how often to log, evaluate and checkpoint (all in steps)."""

  total_steps: int
  steps_per_epoch: int
  log_every: int = 50
  eval_every: int = 0          # 0: once per epoch
  checkpoint_every: int = 0    # 0: once per epoch
  keep_checkpoints: int = 2
  progress: bool = True
  stop_after: int = 0          # > 0: return after this step (tests, time-boxed runs)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local NumPy batch -> global `jax.Array`s sharded on the 'data' axis.

  With one process this is a plain device_put; with several, each process contributes its
  rows (`jax.make_array_from_process_local_data`), the global batch being their concatenation
  in process order.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh) -> dict[str, float]:
  """Top-1, top-5 and mean loss over all real examples of `batches` (padding masked out)."""
  sums: dict[str, float] = {}
  for batch in batches:
    out = eval_step(variables, to_global(batch, mesh))
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  count = max(sums.get('count', 0.0), 1.0)
  return {'top1': sums.get('top1', 0.0) / count, 'top5': sums.get('top5', 0.0) / count,
          'loss': sums.get('loss', 0.0) / count, 'count': sums.get('count', 0.0)}


def _is_finite(metrics: Mapping[str, float]) -> bool:
  return all(math.isfinite(v) for v in metrics.values())


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, leave=True)


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
  """The latest saved state, or `state` itself when there is none.

  Raises:
    CheckpointRestoreError: the latest checkpoint cannot be read (truncated, corrupt, or from
      another model); one line naming its folder and what to do.
  """
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many types
    folder = os.path.join(str(manager.directory), str(step))
    cause = _root_cause(e)
    raise CheckpointRestoreError(
        f'{folder}: the checkpoint cannot be read ({cause}); move that folder away to resume '
        'from the one before it, or use a new --workdir to start over') from None


def _save_model(run: _Run, step: int, subdir: str, variables: Any, desc: ModelInfo) -> None:
  """Writes the model directory `subdir` (process 0); a failed write (e.g. disk full) is a
  CheckpointSaveError naming it (the directory's previous version stays)."""
  if jax.process_index() != 0:
    return
  try:
    model_io.save_model(os.path.join(run.workdir, subdir), variables, desc.model,
                        desc.num_classes, desc.image_size, desc.labels, desc.overrides)
  except (OSError, ValueError) as e:  # TensorStore's write errors are ValueErrors
    raise _save_failure(run, step, e, 'the model', subdir) from None


@dataclasses.dataclass
class _Run:
  """What `fit` carries from step to step besides the `TrainState`."""

  workdir: str
  options: LoopOptions
  manager: ocp.CheckpointManager
  writer: MetricWriter
  own_writer: bool             # `fit` made `writer`, so closes it
  bar: Any                     # tqdm progress bar, or None
  start: int                   # the step resumed from (0: a fresh run)
  end: int                     # the last step of this call (`stop_after` or `total_steps`)
  best: dict[str, Any]         # val metrics of the best eval so far, with its `step`
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  pending: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
  images: int = 0              # images trained on since `t_last`
  t_last: float = dataclasses.field(default_factory=time.perf_counter)
  t_begin: float = dataclasses.field(default_factory=time.perf_counter)

  @property
  def results_path(self) -> str:
    return os.path.join(self.workdir, RESULTS_FILE)

  def logs_at(self, step: int) -> bool:
    """Train metrics are read (NaN check, log, progress) every `log_every` steps, before
    every checkpoint and at the end."""
    return (step % self.options.log_every == 0 or self.checkpoints_at(step)
            or step == self.end)

  def evaluates_at(self, step: int) -> bool:
    return step % (self.options.eval_every or self.options.steps_per_epoch) == 0 or (
        step == self.end)

  def checkpoints_at(self, step: int) -> bool:
    return step % (self.options.checkpoint_every or self.options.steps_per_epoch) == 0 or (
        step == self.end)


def _open_run(state: TrainState, options: LoopOptions, workdir: str,
              writer: MetricWriter | None, log: Callable[[str], None]
              ) -> tuple[_Run, TrainState]:
  """Restores the latest checkpoint (if any) and what the run had logged and kept by then."""
  is_main = jax.process_index() == 0
  manager = checkpoint_manager(workdir, options.keep_checkpoints)
  state = restore_latest(manager, state)
  start = int(jax.device_get(state.step))
  if is_main:  # steps logged after the checkpoint we resume from are logged again
    truncate_metrics(workdir, start)
  own_writer = writer is None
  writer = writer or MetricWriter(workdir, enabled=is_main)
  best = _read_json(os.path.join(workdir, RESULTS_FILE)).get('best', {}) if start > 0 else {}
  if start > 0:
    log(f'resumed from step {start} ({os.path.join(workdir, CHECKPOINT_DIR)})')
  end = options.total_steps if options.stop_after <= 0 else min(options.stop_after,
                                                               options.total_steps)
  bar = _progress(options.total_steps, start, options.progress and is_main)
  return _Run(workdir, options, manager, writer, own_writer, bar, start, end, best), state


def _log_train(run: _Run, step: int) -> None:
  """Means of the pending train metrics to the writer and the bar; NonFiniteLossError on
  NaN/Inf."""
  host = [jax.device_get(m) for m in run.pending]
  run.pending = []
  mean = {f'train/{k}': float(np.mean([h[k] for h in host])) for k in host[0]}
  if not _is_finite(mean):
    good = run.manager.latest_step()
    kept = (f'the last good checkpoint (step {good}) is kept in '
            f'{os.path.join(run.workdir, CHECKPOINT_DIR)}' if good is not None else
            'no checkpoint was written yet (a re-run starts from step 0)')
    raise NonFiniteLossError(
        f'non-finite training metrics at step {step}: '
        f'{ {k: v for k, v in mean.items() if not math.isfinite(v)} }; stopped, {kept}')
  now = time.perf_counter()
  mean['train/images_per_sec'] = run.images / max(now - run.t_last, 1e-9)
  run.images, run.t_last = 0, now
  run.writer.write(step, mean)
  if run.bar is not None:
    run.bar.set_postfix(loss=f'{mean["train/loss"]:.4f}', top1=f'{mean["train/top1"]:.3f}',
                        refresh=False)


def _evaluate_and_keep_best(run: _Run, step: int, state: TrainState, eval_step: Callable,
                            eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
                            mesh: Mesh, model: ModelInfo) -> None:
  """Val metrics to the writer; `model_best` rewritten when top-1 improves."""
  run.last_eval = last_eval = evaluate(eval_step, state.eval_variables, eval_batches(), mesh)
  run.writer.write(step, {f'val/{k}': v for k, v in last_eval.items()})
  if last_eval['top1'] > run.best.get('top1', -1.0):
    run.best = {**last_eval, 'step': step}
    _save_model(run, step, BEST_MODEL_DIR, state.eval_variables, model)
  run.t_last, run.images = time.perf_counter(), 0  # eval time is not training throughput
  if run.bar is not None:
    best = run.best
    run.bar.write(f'step {step}: val top1 {last_eval["top1"]:.4f} top5 '
                  f'{last_eval["top5"]:.4f} loss {last_eval["loss"]:.4f} '
                  f'(best {best["top1"]:.4f} @ {best["step"]})')


def _check_saves(run: _Run, step: int) -> None:
  """Raises CheckpointSaveError if an asynchronous save failed (checked after every step)."""
  try:
    run.manager.check_for_errors()
  except Exception as e:  # noqa: BLE001 - Orbax re-raises whatever its save thread hit
    raise _save_failure(run, step, e) from None


def _save_checkpoint(run: _Run, step: int, state: TrainState) -> None:
  """The whole state (asynchronously, Orbax) and, from process 0, the best-so-far record
  with the last committed checkpoint's step (the one a re-run resumes from)."""
  try:
    run.manager.wait_until_finished()   # the previous save: committed, or its error
  except Exception as e:  # noqa: BLE001
    raise _save_failure(run, step, e) from None
  if jax.process_index() == 0:
    done = committed_steps(run.workdir)
    _write_json(run.results_path, {'best': run.best, 'step': done[-1] if done else 0})
  run.manager.save(step, args=ocp.args.StandardSave(state))


def _close_run(run: _Run, failing: bool = False) -> None:
  """Waits for pending checkpoint writes, then closes the manager, the bar and the writer.

  A failed save raises CheckpointSaveError, unless the run is already `failing` (then the
  first error is the one reported).
  """
  try:
    run.manager.wait_until_finished()
    run.manager.close()
  except Exception as e:  # noqa: BLE001
    if not failing:
      raise _save_failure(run, run.end, e) from None
  if run.bar is not None:
    run.bar.close()
  run.writer.flush()
  if run.own_writer:
    run.writer.close()


def fit(state: TrainState, train_step: Callable, eval_step: Callable, teacher_variables: Any,
        train_batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
        eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
        options: LoopOptions, workdir: str, mesh: Mesh, model: ModelInfo,
        writer: MetricWriter | None = None, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
  """Trains from the latest checkpoint in `workdir` (or from `state`) to `total_steps`.

  Args:
    state: a fresh state (its structure is the restore target).
    train_step: `(state, teacher_variables, global_batch) -> (state, metrics)`.
    eval_step: `(variables, global_batch) -> sums` (see `kdflax.train.step.make_eval_step`).
    teacher_variables: replicated teacher variables, or None.
    train_batches: `start_step -> iterator` of process-local batches for steps
      `start_step, start_step + 1, ...`.
    eval_batches: `() -> iterable` of process-local eval batches (with `mask`).
    options: lengths and intervals.
    workdir: where checkpoints, metrics and model directories go.
    mesh: the device mesh of the step.
    model: description written into the exported model directories.
    writer: metric writer (default: one on `workdir`, process 0 only).
    log: where one-line messages go.

  Returns:
    A summary: final and best val metrics, steps, images/s, wall time.

  Raises:
    NonFiniteLossError: the loss became NaN/Inf (nothing is saved from that point on).
    CheckpointSaveError: a checkpoint save failed (e.g. disk full); raised at the step after
      the failure shows, naming the last committed checkpoint.
  """
  run, state = _open_run(state, options, workdir, writer, log)
  step = run.start
  try:
    iterator = train_batches(run.start)
    for step in range(run.start + 1, run.end + 1):
      batch = next(iterator)
      run.images += len(batch['label']) * jax.process_count()
      state, metrics = train_step(state, teacher_variables, to_global(batch, mesh))
      _check_saves(run, step)
      run.pending.append(metrics)
      if run.logs_at(step):
        _log_train(run, step)
      if run.evaluates_at(step):
        _evaluate_and_keep_best(run, step, state, eval_step, eval_batches, mesh, model)
      if run.checkpoints_at(step):
        _save_checkpoint(run, step, state)
      if run.bar is not None:
        run.bar.update(1)
  except BaseException:
    _close_run(run, failing=True)
    raise
  _close_run(run)

  if step < options.total_steps:  # stopped early on purpose (stop_after)
    return {'step': step, 'best': run.best, 'final': run.last_eval, 'stopped_early': True}
  last_eval = run.last_eval
  if not last_eval:  # resumed a finished run: evaluate once more for the summary
    last_eval = evaluate(eval_step, state.eval_variables, eval_batches(), mesh)
  _save_model(run, step, FINAL_MODEL_DIR, state.eval_variables, model)
  summary = {'step': step, 'best': run.best, 'final': last_eval,
             'wall_seconds': round(time.perf_counter() - run.t_begin, 2)}
  if jax.process_index() == 0:
    _write_json(run.results_path, summary)
  return summary


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj: Mapping[str, Any]) -> None:
  atomic.write_json(path, obj)
