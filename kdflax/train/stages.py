"""The three training stages, wired from a config: teacher fine-tune, baseline student, distil.

    summary = run_stage(config, workdir, 'distill', teacher_dir='runs/x/teacher/model_best')

Each stage builds the data pipeline at the trained model's resolution (and the teacher's, when
distilling), the model(s), the objective, the optimizer and the sharded step, then calls
`kdflax.train.loop.fit`. This is the only place (with the CLI) where data, models, losses and
the trainer meet.

- `teacher`: trains `config.teacher` (optionally from `config.teacher.init_checkpoint`) with
  cross-entropy, using `config.teacher.optim` / `config.teacher.train`.
- `student`: trains `config.model` with cross-entropy (the baseline), using `config.optim` /
  `config.train`.
- `distill`: trains `config.model` with the full `config.loss` against a frozen teacher read
  from a model directory, with the same optimizer and length as the baseline, so the two are
  comparable. With `config.teacher.cache=DIR` (from `kdflax cache-teacher`) the teacher is not
  run: each example shows one of the cache's fixed views and its teacher outputs come from
  the cache (`kdflax.train.teacher_cache`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdflax import atomic
from kdflax.config import save_config
from kdflax.distill.objective import Objective
from kdflax.models import complexity
from kdflax.models.init import init_variables
from kdflax.models.layout import layout_of
from kdflax.train.checkpoint import BEST_MODEL_DIR, ModelInfo
from kdflax.train.loop import RESULTS_FILE, LoopOptions, fit
from kdflax.train.optim import make_optimizer
from kdflax.train.stage_models import (
    StageError,
    cached_teacher,
    check_teacher_cache,
    check_teacher_labels,
    init_trained_model,
    intermediates_shapes,
    load_teacher,
    open_teacher_cache,
    trained_model,
)
from kdflax.train.state import create_train_state
from kdflax.train.step import data_mesh, make_eval_step, make_train_step, replicate

STAGES = ('teacher', 'student', 'distill')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
log = logging.getLogger(__name__)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when `config.distributed.num_processes > 1`."""
  dist = config.distributed
  if int(dist.num_processes) <= 1:
    return
  if jax.distributed.is_initialized():
    return
  # Cross-process collectives between CPU devices (tests, CPU clusters); no effect on GPU/TPU.
  # Must not query the backend before initialize(), so it is set unconditionally.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=dist.coordinator_address or None,
                             num_processes=int(dist.num_processes),
                             process_id=int(dist.process_id))


def stage_loss_config(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
  """`config.loss` for `distill`; only its cross-entropy part for the other stages."""
  loss = config.loss.to_dict()
  if stage == 'distill':
    return loss
  ce_only = {name: {**section, 'weight': 0.0} if isinstance(section, dict) else section
             for name, section in loss.items()}
  ce_only['ce'] = {**loss['ce'], 'weight': 1.0}
  return ce_only


@dataclasses.dataclass
class StageSetup:
  """Everything a stage needs to run (see `prepare_stage`)."""

  stage: str
  data: Any
  module: Any
  teacher: Any
  teacher_variables: Any
  teacher_model: str
  teacher_size: int | None
  state: Any
  train_step: Callable
  eval_step: Callable
  mesh: Any
  options: LoopOptions
  description: ModelInfo     # what model_best / model_final record
  cost: dict[str, float]
  objective: Any = None
  teacher_cache: Any = None    # the TeacherCache a cached distill reads, else None


def _stage_sections(config: ml_collections.ConfigDict, stage: str
                    ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, Any]:
  """`(train section, optim section, compute dtype)` of `stage`."""
  train_cfg = config.teacher.train if stage == 'teacher' else config.train
  optim_cfg = config.teacher.optim if stage == 'teacher' else config.optim
  if train_cfg.compute_dtype not in DTYPES:
    raise StageError(f'config.train.compute_dtype must be one of {sorted(DTYPES)}, '
                     f'got {train_cfg.compute_dtype!r}')
  return train_cfg, optim_cfg, DTYPES[train_cfg.compute_dtype]


def _stage_teacher(config: ml_collections.ConfigDict, stage: str, teacher_dir: str | None,
                   random_teacher: bool, dtype: Any, log_fn: Callable[[str], None]
                   ) -> tuple[Any, tuple[Any, Any, int | None, Any, str]]:
  """`(cache or None, (module, variables, image_size, info, source))` of the stage's teacher.

  Only `distill` has one. With a cache and no teacher directory, it is the teacher the cache
  recorded (abstract variables: its outputs come from the cache).
  """
  if stage != 'distill':
    return None, (None, None, None, None, '')
  cache = open_teacher_cache(config)
  if cache is not None and not (teacher_dir or config.teacher.checkpoint):
    return cache, cached_teacher(cache, config, dtype, log_fn)
  return cache, load_teacher(config, teacher_dir, random_teacher, dtype)


def _state_and_options(config: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                       optim_cfg: ml_collections.ConfigDict, data: Any, variables: Any,
                       adapter_params: Any, mesh: Any, stop_after: int
                       ) -> tuple[Any, LoopOptions]:
  """The replicated initial `TrainState` and the loop's length and intervals."""
  if int(config.data.batch_size) % mesh.size:
    raise StageError(f'config.data.batch_size={config.data.batch_size} must divide by the '
                     f'{mesh.size} devices')
  steps_per_epoch = data.steps_per_epoch
  total_steps = int(train_cfg.num_steps) or int(train_cfg.num_epochs) * steps_per_epoch
  tx = make_optimizer(optim_cfg, total_steps)
  state = replicate(create_train_state(variables, adapter_params, tx, seed=config.seed,
                                       ema_decay=float(train_cfg.ema_decay)), mesh)
  options = LoopOptions(
      total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      log_every=int(train_cfg.log_every), eval_every=int(train_cfg.eval_every),
      checkpoint_every=int(train_cfg.checkpoint_every),
      keep_checkpoints=int(train_cfg.keep_checkpoints),
      progress=bool(train_cfg.progress), stop_after=stop_after)
  return state, options


def _train_step(config: ml_collections.ConfigDict, stage: str, module: Any, teacher: Any,
                cache: Any, objective: Objective, mesh: Any) -> Callable:
  """The sharded train step; the teacher sows only when attention/manifold terms need it."""
  needs_teacher_maps = stage == 'distill' and any(
      float(config.loss[name].weight) > 0 for name in ('attention', 'manifold'))
  return make_train_step(module, None if cache else teacher, objective.apply, mesh,
                         teacher_intermediates=needs_teacher_maps,
                         cached_teacher=cache is not None)


def prepare_stage(config: ml_collections.ConfigDict, stage: str, teacher_dir: str | None = None,
                  log_fn: Callable[[str], None] = print, stop_after: int = 0,
                  random_teacher: bool = False) -> StageSetup:
  """Builds data, model(s), objective, optimizer, state and the sharded steps of a stage.

  `random_teacher=True` (benchmarks only) gives `distill` a freshly initialised teacher of
  `config.teacher` instead of a trained one. Errors in the config, the teacher or the data are
  `StageError`s (or the data's `ValueError`s) raised here, before anything is compiled.
  """
  if stage not in STAGES:
    raise StageError(f'unknown stage {stage!r}; expected one of {STAGES}')
  from kdflax.data.pipeline import make_datasets

  maybe_initialize_distributed(config)
  train_cfg, optim_cfg, dtype = _stage_sections(config, stage)
  trained = trained_model(config, stage)
  cache, (teacher, teacher_vars, teacher_size, info, source) = _stage_teacher(
      config, stage, teacher_dir, random_teacher, dtype, log_fn)
  data = make_datasets(config.data, image_size=trained.image_size,
                       teacher_image_size=None if cache else teacher_size,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       cache_views=cache.num_views if cache else 0, seed=config.seed)
  labels = tuple(data.labels)
  num_classes = len(labels)
  check_teacher_labels(info, source, labels, config)

  key = jax.random.key(config.seed)
  module, variables = init_trained_model(trained, num_classes, dtype, key, log_fn)
  if cache is None and teacher is not None and teacher_vars is None:  # random_teacher
    teacher = teacher.clone(num_classes=num_classes)
    teacher_vars = init_variables(teacher, jax.random.fold_in(key, 2), teacher_size)
  objective = Objective(
      stage_loss_config(config, stage),
      intermediates_shapes(teacher, teacher_vars, teacher_size) if teacher else None,
      intermediates_shapes(module, variables, trained.image_size),
      teacher_layout=layout_of(teacher) if teacher else None,
      student_layout=layout_of(module))
  adapter_params = objective.init(jax.random.fold_in(key, 1))
  if cache is not None:
    check_teacher_cache(cache, config, info, teacher_vars, teacher_size, data, objective,
                        source)
    from kdflax.train.teacher_cache import CachedTeacherData
    data = CachedTeacherData(data, cache)

  mesh = data_mesh()
  state, options = _state_and_options(config, train_cfg, optim_cfg, data, variables,
                                      adapter_params, mesh, stop_after)
  if cache is not None:
    teacher_vars = None
  elif teacher_vars is not None:
    teacher_vars = replicate(teacher_vars, mesh)
  return StageSetup(
      stage=stage, data=data, module=module, teacher=teacher, teacher_variables=teacher_vars,
      teacher_model=info.model if info else (config.teacher.name if teacher else ''),
      teacher_size=teacher_size, state=state,
      train_step=_train_step(config, stage, module, teacher, cache, objective, mesh),
      eval_step=make_eval_step(module, mesh), mesh=mesh, options=options,
      description=ModelInfo(trained.name, num_classes, trained.image_size, labels,
                            _json_overrides(trained.overrides)),
      cost=complexity.model_complexity(module.clone(dtype=jnp.float32), trained.image_size),
      objective=objective, teacher_cache=cache)


def run_stage(config: ml_collections.ConfigDict, workdir: str, stage: str,
              teacher_dir: str | None = None, log_fn: Callable[[str], None] = print,
              stop_after: int = 0) -> dict[str, Any]:
  """Runs one stage to completion (resuming from `workdir` if it holds a checkpoint).

  Args:
    config: a full run config (`kdflax.config.base_config()` layout).
    workdir: this stage's directory (checkpoints, metrics, model_best/, model_final/).
    stage: 'teacher', 'student' or 'distill'.
    teacher_dir: distill only: the teacher's model directory (default
      `config.teacher.checkpoint`).
    log_fn: one-line messages.
    stop_after: > 0 returns after that step (tests of resume).

  Returns:
    The loop summary plus `model_dir` (the best model), `params`, `gmacs`, and
    `corrupt_images` (how many distinct unreadable images the train stream skipped).
  """
  fingerprint = stage_fingerprint(config, stage, teacher_dir)
  finished = finished_summary(workdir, fingerprint)
  if finished is not None and stop_after <= 0:
    log_fn(f'[{stage}] already finished in {workdir} (same config); not rebuilt')
    return finished
  setup = prepare_stage(config, stage, teacher_dir, log_fn, stop_after)
  if jax.process_index() == 0:  # written once data, models and teacher checked out
    save_config(config, workdir)
  desc, cost = setup.description, setup.cost
  log_fn(f'[{stage}] {desc.model} at {desc.image_size}px, {desc.num_classes} classes, '
         f'{cost["params"]:,} params, {cost["gmacs"]:.3f} GMACs; {setup.data.num_train} train '
         f'images, {setup.options.total_steps} steps of {config.data.batch_size} on '
         f'{setup.mesh.size} device(s)'
         + (f'; teacher {setup.teacher_model} at {setup.teacher_size}px' if setup.teacher
            else '')
         + (f' from the cache {setup.teacher_cache.directory} '
            f'({setup.teacher_cache.num_views} views per image)' if setup.teacher_cache
            else ''))
  streams = []

  def train_batches(start_step: int):
    streams.append(setup.data.train(start_step))
    return streams[-1]

  summary = fit(setup.state, setup.train_step, setup.eval_step, setup.teacher_variables,
                train_batches, setup.data.eval, setup.options, workdir, setup.mesh, desc,
                log=log_fn)
  corrupt = sorted({k for s in streams for k in s.corrupt.keys})
  if corrupt:
    skips = sum(s.corrupt.count for s in streams)
    log_fn(f'[{stage}] skipped {len(corrupt)} unreadable image(s) ({skips} time(s) in all; '
           f'each replaced by the next image): {", ".join(corrupt[:10])}')
  summary.update(stage=stage, model=desc.model, params=cost['params'], gmacs=cost['gmacs'],
                 corrupt_images=len(corrupt),
                 model_dir=os.path.join(os.path.abspath(workdir), BEST_MODEL_DIR))
  if not summary.get('stopped_early') and jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, RESULTS_FILE),
                      {**summary, 'fingerprint': fingerprint})
  return summary


def stage_fingerprint(config: ml_collections.ConfigDict, stage: str,
                      teacher_dir: str | None) -> str:
  """A hash of everything that decides a stage's result (not `export`, not logging)."""
  sections = config.to_dict()
  sections.pop('export', None)
  sections.pop('distributed', None)
  for train in (sections['train'], sections['teacher']['train']):
    for key in ('progress', 'log_every'):
      train.pop(key, None)
  teacher = os.path.abspath(teacher_dir) if teacher_dir else ''
  text = json.dumps({'stage': stage, 'teacher_dir': teacher, 'config': sections},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_summary(workdir: str, fingerprint: str) -> dict[str, Any] | None:
  """The stored summary of a stage that finished in `workdir` with this config, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  done = (summary.get('fingerprint') == fingerprint and 'final' in summary
          and os.path.isdir(os.path.join(workdir, BEST_MODEL_DIR)))
  if not done:
    return None
  summary.pop('fingerprint')
  return {**summary, 'model_dir': os.path.join(os.path.abspath(workdir), BEST_MODEL_DIR)}


def _json_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in copy.deepcopy(
      dict(overrides)).items()}
