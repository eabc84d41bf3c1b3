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
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kdflax import atomic
from kdflax.train import checkpoint as model_io
from kdflax.train import interrupt
from kdflax.train.checkpoint import (  # noqa: F401 - CHECKPOINT_DIR ... are also loop's names
    BEST_MODEL_DIR,
    CHECKPOINT_DIR,
    FINAL_MODEL_DIR,
    CheckpointRestoreError,
    ModelInfo,
    checkpoint_manager,
    committed_steps,
    restore_latest,
)
from kdflax.train.checkpoint import root_cause as _root_cause
from kdflax.train.metrics import MetricWriter, truncate_metrics
from kdflax.train.state import TrainState
from kdflax.train.step import batch_sharding

RESULTS_FILE = 'results.json'


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


class CheckpointSaveError(RuntimeError):
  """An (asynchronous) checkpoint save failed, e.g. on a full disk; earlier ones are kept."""


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


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, leave=True)


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
  at: int = 0                  # the last step trained
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
  if not all(math.isfinite(v) for v in mean.values()):
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
    atomic.write_json(run.results_path, {'best': run.best, 'step': done[-1] if done else 0})
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


def _stop_here(run: _Run, step: int, state: TrainState) -> None:
  """A signal stops the run after `step`: its checkpoint (unless the schedule just saved one,
  after the NaN check), committed, and named in `results.json`."""
  if not run.checkpoints_at(step):
    if run.pending:
      _log_train(run, step)
    _save_checkpoint(run, step, state)
  try:
    run.manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _save_failure(run, step, e) from None
  if jax.process_index() == 0:
    atomic.write_json(run.results_path, {'best': run.best, 'step': step})


def _hard_exit_line(run: _Run, signum: int) -> str:
  """What a second signal prints before the process exits at once."""
  done = committed_steps(run.workdir)
  kept = (f'the last committed checkpoint ({os.path.join(run.workdir, CHECKPOINT_DIR)}/'
          f'{done[-1]}) is kept' if done else
          'no checkpoint was committed (a re-run starts from step 0)')
  return (f'second {interrupt.signal_name(signum)} while stopping after step {run.at}: '
          f'stopped at once; {kept}; resume with: {interrupt.resume_command()}')


def _train_steps(run: _Run, state: TrainState, train_step: Callable, eval_step: Callable,
                 teacher_variables: Any,
                 train_batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
                 eval_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], mesh: Mesh,
                 model: ModelInfo) -> tuple[TrainState, int, tuple[int | None, bool]]:
  """Steps `run.start + 1 .. run.end` (see `fit`); `(state, last step, (signal, by_peer))`,
  the signal None unless one stopped the run after that step."""
  step = run.at = run.start
  try:
    iterator = train_batches(run.start)
    for step in range(run.start + 1, run.end + 1):
      batch = next(iterator)
      run.images += len(batch['label']) * jax.process_count()
      state, metrics = train_step(state, teacher_variables, to_global(batch, mesh))
      run.at = step
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
      signum, by_peer = interrupt.should_stop(step)
      if signum:
        _stop_here(run, step, state)
        return state, step, (signum, by_peer)
  except BaseException:
    _close_run(run, failing=True)
    raise
  return state, step, (None, False)


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
    TrainingInterrupted: SIGINT / SIGTERM (`kdflax.train.interrupt`): the step under way was
      finished and checkpointed, and that checkpoint committed (a second signal exits the
      process at once, leaving the committed checkpoints as they are).
  """
  run, state = _open_run(state, options, workdir, writer, log)
  with interrupt.stop_on_signal(functools.partial(_hard_exit_line, run)):
    state, step, (signum, by_peer) = _train_steps(
        run, state, train_step, eval_step, teacher_variables, train_batches, eval_batches,
        mesh, model)
    _close_run(run)
    signum = signum or interrupt.requested()  # a signal while the last save committed
  if signum:
    raise interrupt.TrainingInterrupted(
        signum, step, options.total_steps, os.path.abspath(workdir),
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step)), by_peer)

  if step < options.total_steps:  # stopped early on purpose (stop_after)
    return {'step': step, 'best': run.best, 'final': run.last_eval, 'stopped_early': True}
  last_eval = run.last_eval
  if not last_eval:  # resumed a finished run: evaluate once more for the summary
    last_eval = evaluate(eval_step, state.eval_variables, eval_batches(), mesh)
  _save_model(run, step, FINAL_MODEL_DIR, state.eval_variables, model)
  summary = {'step': step, 'best': run.best, 'final': last_eval,
             'wall_seconds': round(time.perf_counter() - run.t_begin, 2)}
  if jax.process_index() == 0:
    atomic.write_json(run.results_path, summary)
  return summary


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)
