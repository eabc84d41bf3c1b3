"""Faults a user meets on the command line: each is one line on stderr and an exit code,
and nothing that existed before is changed."""

import os
import pathlib

from helpers import data_fixtures as fx

from kdflax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'tests' / 'configs' / 'tiny.py')
SHORT = ['--config.train.num_steps=2', '--config.train.eval_every=2']


def _one_line(capsys) -> list[str]:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('kdflax')]
  assert 'Traceback' not in err, err[-2000:]
  return lines


def test_workdir_that_is_a_file(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.write_text('my notes')
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(workdir), *SHORT,
                   f'--config.data.root={fx.BEANS_SAMPLE}'])
  (line,) = _one_line(capsys)
  assert code == 2 and str(workdir) in line, line
  assert workdir.read_text() == 'my notes'


def test_corrupt_image_in_error_mode_is_one_line(tmp_path, capsys):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 3, 'val': 1})
  bad = sorted((root / 'train' / 'bean_rust').glob('*.jpg'))[0]
  fx.truncate(bad, 0.3)
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(tmp_path / 'w'), *SHORT,
                   f'--config.data.root={root}', '--config.data.on_corrupt=error',
                   '--config.data.cache=False'])
  (line,) = _one_line(capsys)
  assert code == 2 and bad.name in line, line


def test_export_out_under_a_file(tmp_path, capsys):
  blocker = tmp_path / 'out'
  blocker.write_text('x')
  code = cli.main(['export', '--model', 'mobilenetv3_small_050', '--num_classes', '3',
                   '--image_size', '32', '--out', str(blocker / 'm.tflite'), '--no-report',
                   '--allow-mismatch'])
  (line,) = _one_line(capsys)
  assert code == 1 and str(blocker) in line, line
  assert blocker.read_text() == 'x'
  assert not [p for p in os.listdir(tmp_path) if p != 'out']  # no temp left behind
