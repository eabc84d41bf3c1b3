"""Learning curves of one or more training runs from their `metrics.jsonl`.

    figure = learning_curves({'teacher': 'runs/x/teacher', 'distilled': 'runs/x/distill'})
    save_figure(figure, 'runs/x/figures/learning_curves.png')

Left: the training loss (`train/loss`, the mean over each logging interval) per step; right:
validation top-1 (`val/top1`) per step. A run resumed after a crash logs the steps after its
last checkpoint twice; `kdflax.train.metrics.read_metrics` keeps the later record.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

from kdflax import atomic
from kdflax.train.metrics import read_metrics


def series(workdir: str, key: str) -> tuple[list[int], list[float]]:
  """`(steps, values)` of metric `key` in `workdir/metrics.jsonl` (non-finite values dropped)."""
  steps, values = [], []
  for record in read_metrics(workdir):
    value = record.get(key)
    if isinstance(value, int | float):
      steps.append(int(record['step']))
      values.append(float(value))
  return steps, values


def learning_curves(runs: Mapping[str, str], title: str = ''):
  """A Matplotlib figure: train loss and val top-1 against step, one line per run.

  Args:
    runs: legend name -> training workdir (runs without metrics are left out).
    title: the figure's title.

  Raises:
    ValueError: no run has any logged metric.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  drawn = 0
  for name, workdir in runs.items():
    steps, loss = series(workdir, 'train/loss')
    if steps:
      loss_ax.plot(steps, loss, label=name, marker='.' if len(steps) < 30 else None)
      drawn += 1
    steps, top1 = series(workdir, 'val/top1')
    if steps:
      top1_ax.plot(steps, [100 * v for v in top1], marker='o', markersize=3, label=name)
      drawn += 1
  if not drawn:
    plt.close(fig)
    raise ValueError(f'no metrics.jsonl with train/loss or val/top1 in {sorted(runs.values())}')
  loss_ax.set(xlabel='step', ylabel='train loss', yscale='log')
  top1_ax.set(xlabel='step', ylabel='val top-1 (%)')
  for ax in (loss_ax, top1_ax):
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> str:
  """Writes `figure` as PNG to `path` atomically and closes it; returns the path."""
  import matplotlib.pyplot as plt

  buffer = io.BytesIO()
  try:
    figure.savefig(buffer, format='png', dpi=dpi)
  finally:
    plt.close(figure)
  atomic.write_bytes(path, buffer.getvalue())
  return os.fspath(path)
