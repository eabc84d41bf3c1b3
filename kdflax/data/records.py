"""`Records`: the in-memory list of one split's examples, before anything is decoded.

A split is a table of N rows. Each row names one image (a file path, or the encoded bytes a
TFDS dataset stores), its integer label and a stable string key used in reports (the file path
or TFDS file name). The train and eval schedules (`kdflax.data.plan`) pick rows of this table by
index, so resuming, sharding over processes and skipping corrupt images all happen on the
table, before any image is read or decoded.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
  """One split of a source.

  Attributes:
    keys: `(N,)` str, a stable name per example (file path, or TFDS file name / id).
    labels: `(N,)` int32 in `[0, num_classes)`.
    paths: `(N,)` str file paths to read, or None when `encoded` holds the bytes.
    encoded: `(N,)` object array of `bytes` (encoded JPEG/PNG), or None when read from `paths`.
  """

  keys: np.ndarray
  labels: np.ndarray
  paths: np.ndarray | None = None
  encoded: np.ndarray | None = None

  def __post_init__(self):
    n = len(self.keys)
    if (self.paths is None) == (self.encoded is None):
      raise ValueError('Records: give exactly one of `paths` or `encoded`')
    for name in ('labels', 'paths', 'encoded'):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f'Records: {name} has {len(value)} rows, keys has {n}')

  def __len__(self) -> int:
    return len(self.keys)

  def select(self, rows: np.ndarray) -> Records:
    """The records at `rows` (indices or a boolean mask), in that order."""
    take = lambda a: None if a is None else a[rows]
    return Records(self.keys[rows], self.labels[rows], take(self.paths), take(self.encoded))
