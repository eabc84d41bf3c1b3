"""Building a teacher cache: the frozen teacher run once over K fixed views of every image.

    manifest = build_cache(config, 'runs/cache', teacher_dir='runs/teacher/model_best', views=8)

The views are those a train stream made with `cache_views=K` shows (`Datasets.fixed_views`),
at the teacher's resolution. Outputs are gathered into per-shard buffers and each shard is
saved once all its (record, view) pairs are in; the directory is written as
`DIR.partial-<pid>` and renamed to DIR after `manifest.json`, so a killed build leaves no DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdflax import atomic
from kdflax.train.teacher_cache.fingerprint import (
    expected_fingerprint,
    teacher_identity,
    variables_digest,
)
from kdflax.train.teacher_cache.format import (
    FORMAT,
    LOGITS,
    MANIFEST,
    PARTIAL,
    SHARD_BYTES,
    CacheError,
    partial_builds,
    refuse_mixing,
    shard_path,
)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a build runs and records."""

  teacher: Any                      # the teacher module
  variables: Any                    # its variables (host arrays)
  size: int                         # the resolution the teacher sees
  model: str                        # its model name
  source: str                       # its model directory
  data: Any                         # `Datasets` made with `cache_views=K`
  objective: Any                    # the distill run's `Objective`
  shapes: dict[str, tuple[int, ...]]  # LOGITS and '<term>/<pair>' -> per-(record, view) shape
  fingerprint: dict[str, Any]


def _check_request(config: ml_collections.ConfigDict, views: int) -> None:
  """CacheError for mixing, a K out of range, or several processes."""
  from kdflax.data.plan import MAX_VIEWS
  refuse_mixing(config)
  if not 1 <= views <= MAX_VIEWS:
    raise CacheError(f'teacher cache: --views must be in [1, {MAX_VIEWS}], got {views}')
  if jax.process_count() > 1:
    raise CacheError('teacher cache: build it with one process (it is written by one host)')


def _plan(config: ml_collections.ConfigDict, teacher_dir: str | None, views: int) -> _Plan:
  """Loads the teacher and the data and builds the objective the cache is made for."""
  from kdflax.data.pipeline import make_datasets
  from kdflax.distill.objective import Objective
  from kdflax.models import complexity, registry
  from kdflax.models.layout import layout_of
  from kdflax.train import stage_models, stages

  dtype = stages.DTYPES[config.train.compute_dtype]
  teacher, variables, teacher_size, info, source = stage_models.load_teacher(
      config, teacher_dir, False, dtype)
  trained = stage_models.trained_model(config, 'distill')
  data = make_datasets(config.data, image_size=trained.image_size,
                       teacher_image_size=teacher_size, cache_views=views, seed=config.seed)
  teacher_size = int(config.data.teacher_image_size or teacher_size)
  student_size = data.sizes['image']
  labels = tuple(data.labels)
  stage_models.check_teacher_labels(info, source, labels, config)
  student, _ = registry.create_model(trained.name, len(labels), dtype=dtype,
                                     **trained.overrides)
  student_vars = complexity.abstract_variables(student, student_size)
  objective = Objective(
      stages.stage_loss_config(config, 'distill'),
      stage_models.intermediates_shapes(teacher, variables, teacher_size),
      stage_models.intermediates_shapes(student, student_vars, student_size),
      teacher_layout=layout_of(teacher), student_layout=layout_of(student))
  teacher_id = teacher_identity(info, variables_digest(variables))
  fingerprint = expected_fingerprint(config, teacher_id, teacher_size, student_size,
                                     objective, data.train_records, labels, views)
  shapes = {LOGITS: (len(labels),), **objective.target_shapes}
  return _Plan(teacher, variables, teacher_size, info.model, source, data, objective, shapes,
               fingerprint)


def _forward_fn(teacher: Any, objective: Any) -> Callable[[Any, jax.Array], dict[str, Any]]:
  """Jitted `(variables, images) -> {LOGITS: (b, classes), '<term>/<pair>': target}` float32."""
  needs_maps = bool(objective.attention_pairs or objective.manifold_pairs)

  @jax.jit
  def forward(v, images):
    if needs_maps:
      logits, state = teacher.apply(v, images, train=False, mutable=['intermediates'])
      targets = objective.teacher_targets(state['intermediates'])
    else:
      logits, targets = teacher.apply(v, images, train=False), {}
    out = {LOGITS: logits.astype(jnp.float32)}
    out.update({k: t.astype(jnp.float32) for k, t in targets.items()})
    return out

  return forward


def _start_directory(out: str) -> tuple[str, str]:
  """`(DIR, DIR.partial-<pid>)` absolute, the latter created empty, leftovers removed."""
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  for path in partial_builds(out):
    shutil.rmtree(path, ignore_errors=True)
  tmp = f'{out}{PARTIAL}{os.getpid()}'
  os.makedirs(tmp)
  return out, tmp


def _shard_size(shard_images: int, shapes: Mapping[str, tuple[int, ...]], views: int,
                num_images: int) -> int:
  """Records per shard: `shard_images`, or (0) as many as fit in `SHARD_BYTES`; in [1, N]."""
  record_bytes = 4 * views * sum(int(np.prod(shape)) for shape in shapes.values())
  shard_images = int(shard_images) or max(1, SHARD_BYTES // record_bytes)
  return max(1, min(shard_images, num_images))


class _ShardWriter:
  """Per-shard buffers of `(rows, K, *shape)`; a shard is saved once all its pairs are in."""

  def __init__(self, directory: str, shapes: Mapping[str, tuple[int, ...]], num_images: int,
               views: int, shard_images: int, after_shard: Callable[[int], None] | None):
    self.directory, self.shapes, self.num_images = directory, shapes, num_images
    self.views, self.shard_images, self.after_shard = views, shard_images, after_shard
    self.buffers: dict[int, dict[str, np.ndarray]] = {}
    self.filled: dict[int, int] = {}
    self.unreadable: set[int] = set()

  def _rows(self, s: int) -> int:
    return min(self.shard_images, self.num_images - s * self.shard_images)

  def add(self, i: int, v: int, outputs: Mapping[str, np.ndarray] | None) -> None:
    """Stores view `v` of record `i` (`outputs` None: an unreadable image, kept as zeros)."""
    s, local = divmod(i, self.shard_images)
    if s not in self.buffers:
      self.buffers[s] = {k: np.zeros((self._rows(s), self.views, *shape), np.float32)
                         for k, shape in self.shapes.items()}
      self.filled[s] = 0
    if outputs is not None:
      for k in self.shapes:
        self.buffers[s][k][local, v] = outputs[k]
    else:
      self.unreadable.add(i)
    self.filled[s] += 1
    if self.filled[s] == self._rows(s) * self.views:
      for k, values in self.buffers.pop(s).items():
        np.save(shard_path(self.directory, k, s), values)
      if self.after_shard is not None:
        self.after_shard(s)


def _run_teacher(batches: Iterable[Mapping[str, np.ndarray]], forward: Callable,
                 variables: Any, mesh: Any, writer: _ShardWriter) -> None:
  """Feeds every fixed-view batch to the teacher and its real rows to `writer`."""
  from kdflax.train.loop import to_global
  for host in batches:
    result = jax.device_get(forward(variables, to_global(
        {'image': host['teacher_image']}, mesh)['image']))
    for r in np.flatnonzero(host['index'] >= 0):
      outputs = {k: result[k][r] for k in writer.shapes} if host['mask'][r] > 0 else None
      writer.add(int(host['index'][r]), int(host['view'][r]), outputs)
  if writer.buffers:
    raise CacheError(f'teacher cache: shards {sorted(writer.buffers)} were not filled '
                     '(internal error)')


def _write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """`directory/manifest.json`, flushed to disk (it marks the cache complete)."""
  with open(os.path.join(directory, MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def teacher_eval(config: ml_collections.ConfigDict, teacher_dir: str) -> dict[str, Any] | None:
  """`{'split', 'top1', 'top5', 'count'}` of the teacher on `config.data.eval_split` (None
  without one): what a run that only has the cache reports as its teacher's accuracy."""
  if not config.data.eval_split:
    return None
  from kdflax.train.evaluation import evaluate_model_dir
  metrics = evaluate_model_dir(teacher_dir, config)
  return {k: metrics.get(k) for k in ('split', 'top1', 'top5', 'count')}


def build_cache(config: ml_collections.ConfigDict, out: str, teacher_dir: str | None = None,
                views: int = 4, batch_size: int = 0, shard_images: int = 0,
                log_fn: Callable[[str], None] = print,
                after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs the frozen teacher over views `0..views-1` of every train image and writes DIR.

  Args:
    config: the distill run's config (teacher, model, loss, data and `train.compute_dtype`).
    out: the cache directory (replaced when the build completes).
    teacher_dir: the teacher's model directory (default `config.teacher.checkpoint`).
    views: K, fixed augmented views per image.
    batch_size: images per teacher forward (0: `config.data.batch_size`).
    shard_images: records per `.npy` shard (0: as many as fit in `SHARD_BYTES` over all
      arrays; a shard is held in memory while it is filled).
    log_fn: one-line progress messages.
    after_shard: called with each shard number once it is written (tests interrupt here).

  Returns:
    The manifest (also written to `out/manifest.json`).

  Raises:
    CacheError, StageError, ValueError: one-line problems with the config, teacher or data.
  """
  from kdflax.train.step import data_mesh, replicate

  _check_request(config, views)
  plan = _plan(config, teacher_dir, views)
  mesh = data_mesh()
  batch = int(batch_size or config.data.batch_size)
  batch = -(-batch // mesh.size) * mesh.size
  variables = replicate(plan.variables, mesh)
  forward = _forward_fn(plan.teacher, plan.objective)
  out, tmp = _start_directory(out)
  n = plan.data.num_train
  shard_images = _shard_size(shard_images, plan.shapes, views, n)
  steps, batches = plan.data.fixed_views(views, batch, {'teacher_image': plan.size})
  log_fn(f'[cache-teacher] {plan.model} at {plan.size}px over {n} images x {views} views '
         f'({steps} batches of {batch}) -> {out}')
  writer = _ShardWriter(tmp, plan.shapes, n, views, shard_images, after_shard)
  t0 = time.perf_counter()
  _run_teacher(batches, forward, variables, mesh, writer)
  manifest = {'format': FORMAT, 'num_images': n, 'views': views, 'shard_images': shard_images,
              'arrays': {k: list(v) for k, v in plan.shapes.items()},
              'unreadable_images': sorted(writer.unreadable), 'fingerprint': plan.fingerprint,
              'teacher_dir': os.path.abspath(plan.source),
              'build_seconds': round(time.perf_counter() - t0, 2),
              'teacher_eval': teacher_eval(config, plan.source)}
  _write_manifest(tmp, manifest)
  atomic.replace_dir(tmp, out)
  unreadable = writer.unreadable
  log_fn(f'[cache-teacher] wrote {n} x {views} teacher outputs ({", ".join(plan.shapes)}) in '
         f'{manifest["build_seconds"]:.1f} s'
         + (f'; {len(unreadable)} unreadable image(s) stored as zeros' if unreadable else ''))
  return manifest
