"""Checks of a data set before anything trains: errors for what cannot work, warnings for
what probably is a mistake.

    problems = check_splits(labels, train_records, eval_records)   # raises on errors
    for message in problems: log.warning(message)

Errors (`ValueError`, one line): fewer than 2 classes (a classifier of one class learns
nothing and reports 100%), an empty train split, an eval split that is named but empty.
Warnings: a class without train images, heavy class imbalance (the largest class more than
10 times the smallest), and photos that are in both the train and the eval split (same
encoded bytes or same file contents: evaluation would be optimistic), with a count.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from kdflax.data.records import Records

IMBALANCE = 10.0


def _sizes(records: Records) -> list[int]:
  if records.encoded is not None:
    return [len(b) for b in records.encoded]
  return [os.path.getsize(p) for p in records.paths]


def _digests(records: Records, rows: Sequence[int]) -> set[str]:
  """Content hashes of the examples at `rows` (encoded bytes or file contents)."""
  out = set()
  for i in rows:
    if records.encoded is not None:
      data = bytes(records.encoded[i])
    else:
      with open(records.paths[i], 'rb') as f:
        data = f.read()
    out.add(hashlib.sha1(data).hexdigest())
  return out


def shared_photos(train: Records, evaluation: Records) -> int:
  """How many eval photos have identical bytes in the train split (only photos of equal
  size are read and hashed, so a large folder costs a `stat` per file)."""
  train_sizes, eval_sizes = _sizes(train), _sizes(evaluation)
  common = set(train_sizes) & set(eval_sizes)
  if not common:
    return 0
  train_rows = [i for i, n in enumerate(train_sizes) if n in common]
  eval_rows = [i for i, n in enumerate(eval_sizes) if n in common]
  return len(_digests(train, train_rows) & _digests(evaluation, eval_rows))


def check_splits(labels: Sequence[str], train: Records, evaluation: Records | None,
                 where: str = 'the data', check_overlap: bool = True) -> list[str]:
  """Raises on unusable splits; returns warning lines (see the module docstring)."""
  if len(labels) < 2:
    raise ValueError(f'{where}: {len(labels)} class ({", ".join(labels) or "none"}); a '
                     'classifier needs at least 2')
  if len(train) == 0:
    raise ValueError(f'{where}: the train split has no images')
  if evaluation is not None and len(evaluation) == 0:
    raise ValueError(f'{where}: the eval split has no images (set config.data.eval_split=\'\' '
                     'to train without one)')
  warnings = []
  counts = np.bincount(np.asarray(train.labels, np.int64), minlength=len(labels))
  empty = [labels[i] for i in np.flatnonzero(counts == 0)]
  if empty:
    warnings.append(f'{where}: no train images for class(es) {", ".join(empty)}')
  nonzero = counts[counts > 0]
  if len(nonzero) > 1 and nonzero.max() > IMBALANCE * nonzero.min():
    big, small = int(np.argmax(counts)), int(np.argmin(np.where(counts > 0, counts, 1 << 62)))
    warnings.append(f'{where}: class imbalance: {labels[big]} has {counts[big]} train images, '
                    f'{labels[small]} {counts[small]} (over {IMBALANCE:g}x; consider '
                    'resampling or class weights)')
  if check_overlap and evaluation is not None:
    shared = shared_photos(train, evaluation)
    if shared:
      warnings.append(f'{where}: {shared} photo(s) are in both the train and the eval split '
                      '(identical bytes): val accuracy will be optimistic')
  return warnings
