"""Metrics to TensorBoard event files and `metrics.jsonl`, from process 0 only.

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    writer.write(step, {'train/loss': 0.7, 'val/top1': 0.9})
    writer.close()

Each `write` appends one JSON line `{"step": s, "time": unix_seconds, key: value, ...}` and the
same scalars to TensorBoard (tensorboardX). On resume from the checkpoint of step c the loop
first drops the records after step c (`truncate_metrics`: those steps are trained and logged
again), then appends, so the file holds the whole run with one record per step and metric.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdflax import atomic

METRICS_FILE = 'metrics.jsonl'


def _scalar(value: Any) -> float | None:
  try:
    value = float(np.asarray(value))
  except (TypeError, ValueError):
    return None
  return value


class MetricWriter:
  """Writes scalar metrics; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._json = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._json = open(os.path.join(workdir, METRICS_FILE), 'a', buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records `metrics` (name -> scalar) at `step`; non-scalars are skipped."""
    if not self.enabled:
      return
    values = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
    record = {'step': int(step), 'time': round(time.time(), 3)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
    self._json.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def flush(self) -> None:
    if self._json:
      self._json.flush()
    if self._tb:
      self._tb.flush()

  def close(self) -> None:
    if self._json:
      self._json.close()
      self._json = None
    if self._tb:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl` as one run, in step order.

  A run resumed from its last checkpoint logs again the steps after that checkpoint that it
  had logged before stopping; the later records win: a record whose step goes back (or
  repeats a metric already logged at its step) drops the earlier records from that step on.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  kept: list[dict[str, Any]] = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a crash mid-write
      step, keys = record['step'], set(record) - {'step', 'time'}
      if any(r['step'] > step or (r['step'] == step and keys & set(r) - {'step', 'time'})
             for r in kept[-64:]):
        kept = [r for r in kept if r['step'] < step]
      kept.append(record)
  return kept


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops the records after `step` from `workdir/metrics.jsonl` (atomically; no-op if none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line if line.endswith('\n') else line + '\n')
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a crash mid-write
  if len(keep) != len(lines):
    atomic.write_text(path, ''.join(keep))
