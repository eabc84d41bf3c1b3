"""Iterators of NumPy batches over the tf.data graphs, with the corrupt-image bookkeeping.

`TrainIterator` (infinite, resumable at a step) and `EvalIterator` (every example once, with
`mask`) count the corrupt images they meet in `CorruptLog`, log each file once, and raise
`CorruptImageError` in `on_corrupt='error'` mode or after too many in a row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from kdflax.data.errors import CorruptImageError
from kdflax.data.image_table import ImageTable
from kdflax.data.plan import TrainPlan

log = logging.getLogger('kdflax.data.pipeline')
Batch = dict[str, np.ndarray]
__all__ = ['Batch', 'CorruptImageError', 'CorruptLog', 'EvalIterator', 'TrainIterator']


@dataclasses.dataclass
class CorruptLog:
  """Corrupt or unreadable images met by one iterator.

  Attributes:
    count: failed reads (a file met in several epochs counts each time).
    keys: distinct files (source keys), in the order first met.
  """

  count: int = 0
  keys: list[str] = dataclasses.field(default_factory=list)


def _report_failures(corrupt: CorruptLog, table: ImageTable, rows, on_corrupt: str) -> None:
  """Counts failed rows, logs each file once with the reason, raises for 'error'."""
  for index in rows:
    key = str(table.records.keys[index])
    corrupt.count += 1
    if key in corrupt.keys and on_corrupt != 'error':
      continue
    reason = table.diagnose(int(index))
    if on_corrupt == 'error':
      raise CorruptImageError(f"corrupt or unreadable image: {key}: {reason} "
                              "(config.data.on_corrupt='error')")
    corrupt.keys.append(key)
    log.warning('kdflax.data: skipped corrupt or unreadable image %s: %s', key, reason)


class _BatchIterator:
  """NumPy batches of a tf.data graph; a batch's `_skipped` column goes to `_report_skipped`.

  Attributes:
    step: index of the batch the next `next()` returns.
    corrupt: `CorruptLog` of this iterator.
  """

  def __init__(self, dataset: tf.data.Dataset, table: ImageTable, on_corrupt: str,
               start_step: int = 0):
    self.dataset = dataset
    self.step = start_step
    self.corrupt = CorruptLog()
    self._table, self._on_corrupt = table, on_corrupt
    self._it = dataset.as_numpy_iterator()

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    skipped = batch.pop('_skipped')
    if skipped.any():
      self._report_skipped(skipped)
    self.step += 1
    return batch

  def _report_skipped(self, skipped: np.ndarray) -> None:
    """Counts, logs or raises for batch `self.step`'s failed reads (`skipped` `(b,)` int32)."""
    raise NotImplementedError


class TrainIterator(_BatchIterator):
  """Infinite iterator of process-local train batches (dicts of NumPy arrays).

  Attributes:
    step: the step of the batch the next `next()` returns.
    corrupt: `CorruptLog` of this iterator.
  """

  def __init__(self, dataset: tf.data.Dataset, plan: TrainPlan, table: ImageTable,
               start_step: int, on_corrupt: str):
    super().__init__(dataset, table, on_corrupt, start_step)
    self._plan = plan

  def _report_skipped(self, skipped: np.ndarray) -> None:
    """`skipped[r]`: how many of row r's candidates failed before one decoded (all: none did)."""
    candidates = self._plan.step(self.step)['candidates']
    bad = [i for r in np.flatnonzero(skipped) for i in candidates[r, :skipped[r]]]
    _report_failures(self.corrupt, self._table, bad, self._on_corrupt)
    if (skipped >= candidates.shape[1]).any():
      raise CorruptImageError(
          f'{candidates.shape[1]} corrupt images in a row at step {self.step}, e.g. '
          f'{self._table.records.keys[bad[0]]}: is the dataset broken?')


class EvalIterator(_BatchIterator):
  """Finite iterator of process-local eval batches with `mask`; `len()` = number of steps."""

  def __init__(self, dataset: tf.data.Dataset, indices: np.ndarray, table: ImageTable,
               on_corrupt: str):
    super().__init__(dataset, table, on_corrupt)
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def _report_skipped(self, skipped: np.ndarray) -> None:
    """`skipped[r]` is 1 where row r's image failed to decode (the row is masked out)."""
    bad = self._indices[self.step][skipped > 0]
    _report_failures(self.corrupt, self._table, bad, self._on_corrupt)
