"""Teacher-output cache: the frozen teacher run once over K fixed augmented views per image.

    manifest = build_cache(config, 'runs/cache', teacher_dir='runs/teacher/model_best', views=8)
    cache = TeacherCache('runs/cache')          # one-line CacheError if absent or incomplete
    cache.check(expected)                       # one-line CacheError naming a differing field
    outputs = cache.lookup(index, view)         # {'teacher_logits': (b, K), ...}

View v of train record i is the train transform (random-resized crop, flip, RandAugment) with
the seed pair `kdflax.data.plan.view_seeds(seed, i, v)`: a pure function of (seed, i, v). The
build feeds it to the teacher at the teacher's resolution; a train stream made with
`make_datasets(..., cache_views=K)` shows record i in epoch e its view
`epoch_views(seed, e, N, K)[i]`, the same crop at the student's resolution, and yields
`index` and `view` with the batch, so the host gathers the matching teacher outputs.

Stored per (record, view): the teacher's logits and, per attention/manifold pair of the
objective, `Objective.teacher_targets` (the teacher's map, features or tokens already aligned
to the student's grid): the loss from the cache equals the loss with the live teacher on the
same view. Layout of DIR:

    manifest.json                      written last: its presence marks a complete cache
    logits.00000.npy ...               (n, K, classes) float32, n <= shard_images records each
    attention.<pair>.00000.npy ...     (n, K, *target_shape) float32
    manifold.<pair>.00000.npy ...

A build writes into `DIR.partial-<pid>` and renames it to DIR at the end; a killed build
leaves no DIR (a rerun removes the leftover and starts again). Shards are memory-mapped on
read. The manifest's `fingerprint` (see `expected_fingerprint`) must equal the run's; mixup /
CutMix cannot be cached (a mixed image's teacher output depends on its partner).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from kdflax import atomic
from kdflax.train.step import TEACHER_LOGITS, TEACHER_TARGET_PREFIX

FORMAT = 1
MANIFEST = 'manifest.json'
PARTIAL = '.partial-'
LOGITS = 'logits'
SHARD_BYTES = 256 * 2**20
AUGMENTATION_KEYS = ('augment', 'crop_scale', 'crop_ratio', 'flip', 'randaugment_ops',
                     'randaugment_magnitude', 'eval_crop_fraction')
DATA_KEYS = ('source', 'root', 'name', 'data_dir', 'class_prefix', 'hash_split',
             'hash_fractions', 'train_split')


class CacheError(ValueError):
  """A teacher cache cannot be built or used (the message is one line)."""


def refuse_mixing(config: ml_collections.ConfigDict) -> None:
  """CacheError when mixup or CutMix is on: a mixed image's teacher output is not cached."""
  data = config.data
  if float(data.mixup_alpha) > 0 or float(data.cutmix_alpha) > 0:
    raise CacheError(f'teacher cache: config.data.mixup_alpha={data.mixup_alpha} / '
                     f'cutmix_alpha={data.cutmix_alpha} mix two images, whose teacher outputs a '
                     'cache cannot hold; set both to 0, or distill with the live teacher')


# ---------------------------------------------------------------------------- fingerprint


def variables_digest(variables: Mapping[str, Any]) -> str:
  """sha256 of every variable (path, dtype, shape, bytes), in sorted path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(dict(variables), sep='/').items()):
    leaf = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f'{path}|{leaf.dtype}|{leaf.shape}|'.encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def records_digest(records: Any) -> str:
  """sha256 of a split's file list: keys, labels and (for files) their sizes."""
  h = hashlib.sha256()
  h.update(json.dumps([str(k) for k in records.keys]).encode())
  h.update(np.asarray(records.labels, np.int64).tobytes())
  if records.paths is not None:
    h.update(json.dumps([os.path.getsize(p) if os.path.exists(p) else -1
                         for p in records.paths]).encode())
  return h.hexdigest()


def _plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def teacher_identity(info: Any, digest: str | None) -> dict[str, Any]:
  """The fingerprint's `teacher` entry: model, classes, overrides, variables digest."""
  return {'model': info.model, 'num_classes': int(info.num_classes),
          'overrides': _plain(info.overrides), 'variables_sha256': digest}


def target_specs(objective: Any) -> dict[str, dict[str, Any]]:
  """`'<term>/<pair>'` -> what its teacher target depends on (keys, kinds, distance, p, grid,
  shape); weights and normalisation are applied later and may change freely."""
  c = objective.config
  specs = {}
  for term, pairs in (('attention', objective.attention_pairs),
                      ('manifold', objective.manifold_pairs)):
    for pair in pairs:
      key = f'{term}/{pair.name}'
      spec = {'teacher': pair.teacher.key, 'teacher_kind': pair.teacher.kind,
              'student': pair.student.key, 'student_kind': pair.student.kind,
              'shape': list(objective.target_shapes[key])}
      if term == 'attention':
        spec['distance'] = pair.distance
        if pair.distance == 'map':
          spec['p'] = float(c['attention']['p'])
      else:
        spec['grid'] = c['manifold']['grid']
      specs[key] = spec
  return specs


def expected_fingerprint(config: ml_collections.ConfigDict, teacher: Mapping[str, Any],
                         teacher_size: int, student_size: int, objective: Any, records: Any,
                         labels: tuple[str, ...], views: int) -> dict[str, Any]:
  """What a cache for this run must have been built from.

  Args:
    config: the run config (data section, `train.compute_dtype`).
    teacher: `{'model', 'num_classes', 'overrides', 'variables_sha256'}` of the teacher.
    teacher_size, student_size: the resolutions the teacher and the student see.
    objective: the run's `Objective` (its pairs fix the stored targets).
    records: the train split's `Records`; labels: its class names.
    views: K.
  """
  data = config.data
  data_fields = {k: _plain(data[k]) for k in DATA_KEYS}
  if data.source == 'folder':
    data_fields['root'] = os.path.abspath(os.path.expanduser(data.root))
  data_fields.update(labels=list(labels), num_train=len(records),
                     files_sha256=records_digest(records))
  return {
      'format': FORMAT,
      'teacher': _plain(teacher),
      'teacher_image_size': int(teacher_size),
      'student_image_size': int(student_size),
      'compute_dtype': str(config.train.compute_dtype),
      'targets': target_specs(objective),
      'data': data_fields,
      'seed': int(config.seed),
      'views': int(views),
      'augmentation': {k: _plain(data[k]) for k in AUGMENTATION_KEYS},
  }


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value and key != 'targets':
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _short(value: Any, limit: int = 50) -> str:
  text = ' '.join(json.dumps(value, sort_keys=True).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


def fingerprint_difference(cached: Mapping[str, Any], expected: Mapping[str, Any]
                           ) -> tuple[str, Any, Any] | None:
  """`(field, cached value, expected value)` of the first difference, or None.

  The run's targets must each be in the cache with the same spec (a cache may hold more).
  """
  a, b = _flatten(cached), _flatten(expected)
  for key in b:
    if key == 'targets':
      have, want = a.get('targets', {}), b['targets']
      for name, spec in want.items():
        if have.get(name) != spec:
          return f'targets.{name}', have.get(name), spec
      continue
    if key not in a or a[key] != b[key]:
      return key, a.get(key), b[key]
  extra = [k for k in a if k not in b]
  if extra:
    return extra[0], a[extra[0]], None
  return None


# ---------------------------------------------------------------------------- reading


def _array_file(name: str) -> str:
  return name.replace('/', '.')


class TeacherCache:
  """A complete cache directory, memory-mapped.

  Attributes:
    directory: absolute path.
    manifest: the parsed `manifest.json`.
    num_images, num_views, shard_images: N, K and records per shard.
    arrays: `'logits'` and `'<term>/<pair>'` -> per-(record, view) shape.

  Raises:
    CacheError: no cache at `directory`, an interrupted build, or an unreadable manifest.
  """

  def __init__(self, directory: str):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    path = os.path.join(self.directory, MANIFEST)
    if not os.path.isfile(path):
      partial = glob.glob(glob.escape(self.directory) + PARTIAL + '*')
      if partial or os.path.isdir(self.directory):
        raise CacheError(f'teacher cache {self.directory}: incomplete (no {MANIFEST}: the build '
                         'was interrupted); rerun kdflax cache-teacher')
      raise CacheError(f'teacher cache {self.directory}: not found; build it with '
                       'kdflax cache-teacher')
    try:
      with open(path) as f:
        self.manifest = json.load(f)
      self.num_images = int(self.manifest['num_images'])
      self.num_views = int(self.manifest['views'])
      self.shard_images = int(self.manifest['shard_images'])
      self.arrays = {k: tuple(v) for k, v in self.manifest['arrays'].items()}
      self.fingerprint = self.manifest['fingerprint']
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CacheError(f'{path}: unreadable manifest ({type(e).__name__}: {e})') from None
    if self.manifest.get('format') != FORMAT:
      raise CacheError(f'{path}: cache format {self.manifest.get("format")!r}, this kdflax '
                       f'reads {FORMAT}; rebuild it with kdflax cache-teacher')
    self.num_shards = -(-self.num_images // self.shard_images)
    self._maps: dict[tuple[str, int], np.ndarray] = {}

  def check(self, expected: Mapping[str, Any]) -> None:
    """CacheError naming the first field where the cache differs from `expected`."""
    diff = fingerprint_difference(self.fingerprint, expected)
    if diff:
      field, have, want = diff
      raise CacheError(f'teacher cache {self.directory} does not match this run: {field} is '
                       f'{_short(have)} in the cache, {_short(want)} here; rebuild it with '
                       'kdflax cache-teacher')

  def shard(self, name: str, shard: int) -> np.ndarray:
    """`(n, K, *shape)` memory-mapped shard `shard` of array `name`."""
    key = (name, shard)
    if key not in self._maps:
      path = os.path.join(self.directory, f'{_array_file(name)}.{shard:05d}.npy')
      try:
        self._maps[key] = np.load(path, mmap_mode='r')
      except (OSError, ValueError) as e:
        raise CacheError(f'teacher cache shard {path}: {e}') from None
    return self._maps[key]

  def lookup(self, index: np.ndarray, view: np.ndarray) -> dict[str, np.ndarray]:
    """The cached outputs of `(b,)` records `index` at views `view`, as batch entries.

    Returns:
      `{'teacher_logits': (b, classes), 'teacher_target:<term>/<pair>': (b, *shape)}` float32.
    """
    index, view = np.asarray(index, np.int64), np.asarray(view, np.int64)
    if index.size and (index.min() < 0 or index.max() >= self.num_images
                       or view.min() < 0 or view.max() >= self.num_views):
      raise CacheError(f'teacher cache {self.directory}: record/view out of range '
                       f'({self.num_images} records, {self.num_views} views)')
    shard, local = np.divmod(index, self.shard_images)
    out = {}
    for name, shape in self.arrays.items():
      values = np.empty((len(index), *shape), np.float32)
      for s in np.unique(shard):
        rows = np.flatnonzero(shard == s)
        values[rows] = self.shard(name, int(s))[local[rows], view[rows]]
      out[TEACHER_LOGITS if name == LOGITS else TEACHER_TARGET_PREFIX + name] = values
    return out


class CachedTeacherStream:
  """A train iterator whose batches carry the cached teacher outputs of their views.

  Pops `index` and `view` (and `teacher_image`, unused) and adds `teacher_logits` and
  `teacher_target:*` (see `TeacherCache.lookup`); `corrupt` and `step` are the wrapped
  iterator's.
  """

  def __init__(self, iterator: Iterator[dict[str, np.ndarray]], cache: TeacherCache):
    self._it, self._cache = iterator, cache

  @property
  def corrupt(self):
    return self._it.corrupt

  @property
  def step(self) -> int:
    return self._it.step

  def __iter__(self) -> CachedTeacherStream:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._it))
    index, view = batch.pop('index'), batch.pop('view')
    batch.pop('teacher_image', None)
    batch.update(self._cache.lookup(index, view))
    return batch


class CachedTeacherData:
  """A `kdflax.data.pipeline.Datasets` (made with `cache_views=K`) whose `train()` batches carry
  the cached teacher outputs; everything else is the wrapped object's."""

  def __init__(self, data: Any, cache: TeacherCache):
    self._data, self.cache = data, cache

  def __getattr__(self, name: str) -> Any:
    return getattr(self._data, name)

  def train(self, start_step: int = 0) -> CachedTeacherStream:
    return CachedTeacherStream(self._data.train(start_step), self.cache)


# ---------------------------------------------------------------------------- building


def _remove_partials(directory: str) -> None:
  for path in glob.glob(glob.escape(directory) + PARTIAL + '*'):
    shutil.rmtree(path, ignore_errors=True)


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
  from kdflax.data.pipeline import make_datasets
  from kdflax.data.plan import MAX_VIEWS
  from kdflax.distill.objective import Objective
  from kdflax.models import complexity, registry
  from kdflax.models.layout import layout_of
  from kdflax.train import stages
  from kdflax.train.loop import to_global
  from kdflax.train.step import data_mesh, replicate

  refuse_mixing(config)
  if not 1 <= views <= MAX_VIEWS:
    raise CacheError(f'teacher cache: --views must be in [1, {MAX_VIEWS}], got {views}')
  if jax.process_count() > 1:
    raise CacheError('teacher cache: build it with one process (it is written by one host)')
  dtype = stages.DTYPES[config.train.compute_dtype]
  teacher, variables, teacher_size, info, source = stages.load_teacher(config, teacher_dir,
                                                                       False, dtype)
  trained = stages.trained_model(config, 'distill')
  data = make_datasets(config.data, image_size=trained.image_size,
                       teacher_image_size=teacher_size, cache_views=views, seed=config.seed)
  teacher_size = int(config.data.teacher_image_size or teacher_size)
  student_size = data.sizes['image']
  labels = tuple(data.labels)
  stages.check_teacher_labels(info, source, labels, config)
  student, _ = registry.create_model(trained.name, len(labels), dtype=dtype,
                                     **trained.overrides)
  student_vars = complexity.abstract_variables(student, student_size)
  objective = Objective(
      stages.stage_loss_config(config, 'distill'),
      stages.intermediates_shapes(teacher, variables, teacher_size),
      stages.intermediates_shapes(student, student_vars, student_size),
      teacher_layout=layout_of(teacher), student_layout=layout_of(student))
  teacher_id = teacher_identity(info, variables_digest(variables))
  fingerprint = expected_fingerprint(config, teacher_id, teacher_size, student_size,
                                     objective, data.train_records, labels, views)
  needs_maps = bool(objective.attention_pairs or objective.manifold_pairs)

  mesh = data_mesh()
  batch = int(batch_size or config.data.batch_size)
  batch = -(-batch // mesh.size) * mesh.size
  variables = replicate(variables, mesh)

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

  shapes = {LOGITS: (len(labels),), **objective.target_shapes}
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  _remove_partials(out)
  tmp = f'{out}{PARTIAL}{os.getpid()}'
  os.makedirs(tmp)
  n = data.num_train
  record_bytes = 4 * views * sum(int(np.prod(shape)) for shape in shapes.values())
  shard_images = int(shard_images) or max(1, SHARD_BYTES // record_bytes)
  shard_images = max(1, min(shard_images, n))
  steps, batches = data.fixed_views(views, batch, {'teacher_image': teacher_size})
  log_fn(f'[cache-teacher] {info.model} at {teacher_size}px over {n} images x {views} views '
         f'({steps} batches of {batch}) -> {out}')
  buffers: dict[int, dict[str, np.ndarray]] = {}
  filled: dict[int, int] = {}
  unreadable: set[int] = set()
  t0 = time.perf_counter()

  def shard_rows(s: int) -> int:
    return min(shard_images, n - s * shard_images)

  for host in batches:
    result = jax.device_get(forward(variables, to_global(
        {'image': host['teacher_image']}, mesh)['image']))
    for r in np.flatnonzero(host['index'] >= 0):
      i, v = int(host['index'][r]), int(host['view'][r])
      s, local = divmod(i, shard_images)
      if s not in buffers:
        buffers[s] = {k: np.zeros((shard_rows(s), views, *shape), np.float32)
                      for k, shape in shapes.items()}
        filled[s] = 0
      if host['mask'][r] > 0:
        for k in shapes:
          buffers[s][k][local, v] = result[k][r]
      else:
        unreadable.add(i)
      filled[s] += 1
      if filled[s] == shard_rows(s) * views:
        for k, values in buffers.pop(s).items():
          np.save(os.path.join(tmp, f'{_array_file(k)}.{s:05d}.npy'), values)
        if after_shard is not None:
          after_shard(s)
  if buffers:
    raise CacheError(f'teacher cache: shards {sorted(buffers)} were not filled (internal error)')
  manifest = {'format': FORMAT, 'num_images': n, 'views': views, 'shard_images': shard_images,
              'arrays': {k: list(v) for k, v in shapes.items()},
              'unreadable_images': sorted(unreadable), 'fingerprint': fingerprint,
              'teacher_dir': os.path.abspath(source),
              'build_seconds': round(time.perf_counter() - t0, 2)}
  path = os.path.join(tmp, MANIFEST)
  with open(path, 'w') as f:
    json.dump(manifest, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  atomic.replace_dir(tmp, out)
  log_fn(f'[cache-teacher] wrote {n} x {views} teacher outputs ({", ".join(shapes)}) in '
         f'{manifest["build_seconds"]:.1f} s'
         + (f'; {len(unreadable)} unreadable image(s) stored as zeros' if unreadable else ''))
  return manifest
