"""Reading a complete teacher cache: its manifest, memory-mapped shards and cached batches.

    cache = TeacherCache('runs/cache')          # one-line CacheError if absent or incomplete
    cache.check(expected)                       # one-line CacheError naming a differing field
    outputs = cache.lookup(index, view)         # {'teacher_logits': (b, K), ...}
    data = CachedTeacherData(datasets, cache)   # train() batches carry those outputs
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kdflax.train.step import TEACHER_LOGITS, TEACHER_TARGET_PREFIX
from kdflax.train.teacher_cache.fingerprint import fingerprint_difference
from kdflax.train.teacher_cache.format import (
    FORMAT,
    LOGITS,
    MANIFEST,
    CacheError,
    partial_builds,
    shard_path,
)


def _short(value: Any, limit: int = 50) -> str:
  text = ' '.join(json.dumps(value, sort_keys=True).split())
  return text if len(text) <= limit else text[:limit - 3] + '...'


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
      if partial_builds(self.directory) or os.path.isdir(self.directory):
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
      path = shard_path(self.directory, name, shard)
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
