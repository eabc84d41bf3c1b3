"""The models a stage works with: the one it trains and the teacher it distils from.

    trained = trained_model(config, 'distill')        # name, overrides, resolution, init dir
    module, variables, size, info, source = load_teacher(config, 'runs/x/teacher/model_best',
                                                         False, jnp.float32)

The teacher comes from a model directory (`kdflax.train.checkpoint`), from what a teacher
cache recorded (`cached_teacher`: module and abstract variables, outputs from the cache), or
is freshly initialised (benchmarks). Problems a user can cause are one-line `StageError`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from kdflax.models import complexity, quant, registry
from kdflax.models.init import init_variables
from kdflax.train import checkpoint as model_io
from kdflax.train import pretrained


class StageError(ValueError):
  """A stage cannot start: inconsistent config, teacher or data (one-line message)."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """The model a stage trains: its name, create_model overrides and resolution."""

  name: str
  overrides: Mapping[str, Any]
  image_size: int
  init_checkpoint: str


# Overrides a model inherits from its init checkpoint unless the config sets them: the
# input normalisation the initial weights were trained with.
INHERITED_OVERRIDES = ('mean', 'std')


def trained_model(config: ml_collections.ConfigDict, stage: str) -> TrainedModel:
  """The model `stage` trains (the teacher for 'teacher', else the student).

  A `pretrained:<model>` init checkpoint is resolved to its cached model directory
  (`kdflax.train.pretrained`, converted on first use); the init directory's input
  normalisation (`mean`, `std` overrides) carries over unless the config sets its own.
  """
  section = config.teacher if stage == 'teacher' else config.model
  overrides = dict(section.overrides)
  init_dir = section.init_checkpoint
  if init_dir:
    try:
      init_dir = pretrained.resolve_model_dir(init_dir)
      info = model_io.read_model_info(init_dir)
    except (ValueError, FileNotFoundError) as e:
      raise StageError(f'{stage}: init_checkpoint: {e}') from None
    if info.model == section.name:
      overrides = {**{k: tuple(v) for k, v in info.overrides.items()
                      if k in INHERITED_OVERRIDES}, **overrides}
  _, default_size = registry.create_model(section.name, 1, **overrides)
  return TrainedModel(section.name, overrides, int(section.image_size or default_size),
                      init_dir)


def init_trained_model(trained: TrainedModel, num_classes: int, dtype: Any, key: jax.Array,
                       log_fn: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
  """`(module, variables)` of the trained model: fresh from `key`, then whatever its
  `init_checkpoint` holds that fits (see `load_initial_variables`)."""
  module, _ = registry.create_model(trained.name, num_classes, dtype=dtype, **trained.overrides)
  variables = init_variables(module, key, trained.image_size)
  if trained.init_checkpoint:
    variables = load_initial_variables(variables, trained.init_checkpoint, log_fn)
  return module, variables


def intermediates_shapes(module, variables: Any, image_size: int) -> dict[str, Any]:
  """`jax.eval_shape` of a model's sown intermediates for a batch of 1."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, xx: module.apply(v, xx, train=False, mutable=['intermediates']), variables, x)
  return dict(state.get('intermediates', {}))


def load_initial_variables(variables: Mapping[str, Any], directory: str,
                           log_fn: Callable[[str], None]) -> dict[str, Any]:
  """Copies every variable of the model dir at `directory` whose path and shape match.

  Heads of another size (an ImageNet checkpoint fine-tuned on 10 classes) keep their fresh
  initialisation; the caller is told which. Nothing else may differ.
  """
  info, loaded = model_io.load_model(directory)
  fresh = traverse_util.flatten_dict(dict(variables), sep='/')
  ckpt = traverse_util.flatten_dict(dict(loaded), sep='/')
  kept, reinit = {}, []
  for key, value in fresh.items():
    if key in ckpt and tuple(ckpt[key].shape) == tuple(value.shape):
      kept[key] = jnp.asarray(ckpt[key], value.dtype)
    else:
      kept[key] = value
      if not quant.is_range_variable(key):  # int8 ranges of a QAT model start from its data
        reinit.append(key)
  missing_ratio = len(reinit) / max(len(fresh), 1)
  if missing_ratio > 0.1:
    raise StageError(f'{directory}: init checkpoint of {info.model} does not fit: '
                     f'{len(reinit)} of {len(fresh)} variables differ (e.g. {reinit[:3]})')
  if reinit:
    log_fn(f'init from {directory}: re-initialised {", ".join(reinit)}')
  return traverse_util.unflatten_dict(kept, sep='/')


def load_teacher(config: ml_collections.ConfigDict, teacher_dir: str | None,
                 random_teacher: bool, dtype: Any) -> tuple[Any, Any, int, Any, str]:
  """`(module, variables, image_size, info-or-None, source)` of the distillation teacher."""
  if random_teacher:  # benchmarks: the speed of a step does not depend on the weights
    module, size = registry.create_model(config.teacher.name, 1, dtype=dtype,
                                         **dict(config.teacher.overrides))
    return module, None, int(config.teacher.image_size or size), None, 'random'
  teacher_dir = teacher_dir or config.teacher.checkpoint
  if not teacher_dir:
    raise StageError('distill needs a teacher: --teacher_workdir DIR, or '
                     '--config.teacher.checkpoint=MODEL_DIR (from `kdflax teacher` or '
                     '`kdflax convert`)')
  try:
    info, variables = model_io.load_model(teacher_dir)
  except (FileNotFoundError, ValueError) as e:
    raise StageError(f'teacher: {e}') from None
  module, size = info.create(dtype=dtype)
  return module, variables, int(config.teacher.image_size or size), info, teacher_dir


def check_teacher_labels(info: Any, source: str, labels: tuple[str, ...],
                         config: ml_collections.ConfigDict) -> None:
  """StageError when a teacher's classes or labels differ from the data's."""
  if info is not None and info.num_classes != len(labels):
    raise StageError(
        f'teacher {source} has {info.num_classes} classes but the data '
        f'({config.data.source}: {config.data.root or config.data.name}) has {len(labels)}; '
        'fine-tune the teacher on this data first (kdflax teacher)')
  if info is not None and info.labels and tuple(info.labels) != labels:
    raise StageError(f'teacher {source} labels {list(info.labels)} differ from the data '
                     f'labels {list(labels)}')


def open_teacher_cache(config: ml_collections.ConfigDict) -> Any:
  """The `TeacherCache` at `config.teacher.cache` (None when unset); refuses mixing."""
  if not config.teacher.cache:
    return None
  from kdflax.train import teacher_cache
  teacher_cache.refuse_mixing(config)
  return teacher_cache.TeacherCache(config.teacher.cache)


def cached_teacher(cache: Any, config: ml_collections.ConfigDict, dtype: Any,
                    log_fn: Callable[[str], None]):
  """The teacher a cache recorded (module and abstract variables: shapes only)."""
  recorded = cache.fingerprint['teacher']
  info = model_io.ModelInfo(recorded['model'], int(recorded['num_classes']),
                            int(cache.fingerprint['teacher_image_size']),
                            overrides=dict(recorded.get('overrides', {})))
  module, size = info.create(dtype=dtype)
  size = int(config.teacher.image_size or size)
  variables = complexity.abstract_variables(module, size)
  log_fn(f'teacher outputs from {cache.directory} ({info.model}, as recorded; pass '
         '--teacher_workdir to check the teacher too)')
  return module, variables, size, info, cache.directory


def check_teacher_cache(cache: Any, config: ml_collections.ConfigDict, info: Any,
                         teacher_vars: Any, teacher_size: int, data: Any, objective: Any,
                         source: str) -> None:
  """CacheError unless `cache` was built for this run (teacher, sizes, pairs, data, K...)."""
  from kdflax.train import teacher_cache
  recorded = cache.fingerprint['teacher']
  if source == cache.directory:  # no teacher given: the recorded one, its hash unchecked
    digest = recorded.get('variables_sha256')
  else:
    digest = teacher_cache.variables_digest(teacher_vars)
  teacher_id = teacher_cache.teacher_identity(info, digest)
  expected = teacher_cache.expected_fingerprint(
      config, teacher_id, int(config.data.teacher_image_size or teacher_size),
      data.sizes['image'], objective, data.train_records, tuple(data.labels), cache.num_views)
  cache.check(expected)
