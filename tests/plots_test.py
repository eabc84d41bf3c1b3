"""Learning curves from metrics.jsonl and the `kdflax figures` command without models."""

import json

import numpy as np
import pytest
from PIL import Image

from kdflax import cli
from kdflax.plots.learning_curves import learning_curves, save_figure


def _metrics(folder, rows):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / 'metrics.jsonl', 'w') as f:
    for row in rows:
      f.write(json.dumps({'time': 0.0, **row}) + '\n')
  return str(folder)


def test_curves_draw_each_run_loss_and_top1_in_percent(tmp_path):
  a = _metrics(tmp_path / 'a', [{'step': 1, 'train/loss': 2.0}, {'step': 2, 'train/loss': 1.0},
                                {'step': 2, 'val/top1': 0.5}])
  b = _metrics(tmp_path / 'b', [{'step': 1, 'train/loss': 3.0}, {'step': 1, 'val/top1': 0.25},
                                {'step': 2, 'val/top1': 'nan'}])
  fig = learning_curves({'A': a, 'B': b, 'empty': str(tmp_path / 'none')})
  loss_ax, top1_ax = fig.axes
  assert [line.get_label() for line in loss_ax.lines] == ['A', 'B']
  np.testing.assert_array_equal(loss_ax.lines[0].get_ydata(), [2.0, 1.0])
  assert [list(line.get_ydata()) for line in top1_ax.lines] == [[50.0], [25.0]]  # nan dropped
  path = save_figure(fig, tmp_path / 'out' / 'curves.png')
  assert Image.open(path).size[0] > 100
  with pytest.raises(ValueError, match='no metrics.jsonl'):
    learning_curves({'empty': str(tmp_path / 'none')})


def test_figures_command_with_named_workdirs(tmp_path, capsys):
  base = _metrics(tmp_path / 'm' / 'baseline_s0', [{'step': 1, 'train/loss': 1.0}])
  kd = _metrics(tmp_path / 'm' / 'kd_s0', [{'step': 1, 'train/loss': 0.9}])
  out = tmp_path / 'fig'
  code = cli.main(['figures', '--config', 'configs/quickstart.py', '--baseline_workdir', base,
                   '--distill_workdir', kd, '--out', str(out)])
  assert code == 0
  assert (out / 'learning_curves.png').exists() and not (out / 'attention.png').exists()
  assert 'attention: skipped' in capsys.readouterr().out
  assert cli.main(['figures', '--config', 'configs/quickstart.py', '--distill_workdir', kd]) == 2
