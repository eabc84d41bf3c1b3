"""Faults a user meets on the command line: each is one line on stderr and an exit code,
and nothing that existed before is changed."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
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


@pytest.fixture
def small_disk(tmp_path):
  """A 900 KiB tmpfs: room for one tiny checkpoint (~540 KiB) but not two. Skipped where
  mounting is not allowed (no root / no CAP_SYS_ADMIN)."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=900k', 'tmpfs', str(mount)],
                        capture_output=True, check=False)
  if done.returncode:
    pytest.skip(f'cannot mount a size-limited tmpfs here: {done.stderr.decode().strip()}')
  try:
    yield mount
  finally:
    subprocess.run(['umount', str(mount)], check=False)


def test_disk_full_during_training_stops_with_one_line_and_keeps_the_committed_checkpoint(
    small_disk, tmp_path):
  from kdflax.train.loop import committed_steps
  workdir = small_disk / 'run'
  done = subprocess.run(
      [sys.executable, '-m', 'kdflax.cli', 'student', '--config', CONFIG, '--workdir',
       str(workdir), '--config.train.num_steps=6', '--config.train.checkpoint_every=2',
       f'--config.data.root={fx.BEANS_SAMPLE}'],
      capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
  lines = [line for line in done.stderr.splitlines() if line.startswith('kdflax student:')]
  assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
  assert 'No space left on device' in lines[0], lines[0]
  assert 'Traceback' not in done.stderr and 'ERROR:absl' not in done.stderr, done.stderr[-3000:]
  # What results.json names is a committed checkpoint, and a re-run on a disk with room
  # resumes from it.
  record = json.loads((workdir / 'results.json').read_text())
  assert record['step'] in committed_steps(str(workdir)) and record['step'] >= 2
  moved = tmp_path / 'moved'
  shutil.copytree(workdir, moved)
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(moved),
                   '--config.train.num_steps=6', '--config.train.checkpoint_every=2',
                   f'--config.data.root={fx.BEANS_SAMPLE}'])
  assert code == 0
  assert json.loads((moved / 'results.json').read_text())['step'] == 6


def test_truncated_checkpoint_is_one_line_and_the_one_before_it_resumes(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'kdflax.cli', 'student', '--config', CONFIG, '--workdir',
             str(workdir), '--config.train.checkpoint_every=2',
             f'--config.data.root={fx.BEANS_SAMPLE}']
  first = subprocess.run([*command, '--config.train.num_steps=4'], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, check=False)
  assert first.returncode == 0, first.stderr[-2000:]
  for blob in (workdir / 'checkpoints' / '4').rglob('d/*'):
    if blob.is_file():
      os.truncate(blob, 10)
  def good_files():  # the earlier checkpoint and the metrics log must not change
    files = sorted(p for p in (workdir / 'checkpoints' / '2').rglob('*') if p.is_file())
    return {str(p): p.read_bytes() for p in [*files, workdir / 'metrics.jsonl']}
  kept = good_files()
  again = subprocess.run([*command, '--config.train.num_steps=6'], capture_output=True,
                         text=True, timeout=600, cwd=ROOT, check=False)
  lines = [line for line in again.stderr.splitlines() if line.startswith('kdflax student:')]
  assert again.returncode == 2 and len(lines) == 1, again.stderr[-3000:]
  assert f'{workdir / "checkpoints" / "4"}: the checkpoint cannot be read' in lines[0]
  assert 'Traceback' not in again.stderr, again.stderr[-3000:]
  assert good_files() == kept
  # The advice works: without the damaged folder the run resumes from step 2 and finishes.
  shutil.move(str(workdir / 'checkpoints' / '4'), str(tmp_path / 'damaged'))
  done = subprocess.run([*command, '--config.train.num_steps=6'], capture_output=True,
                        text=True, timeout=600, cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads((workdir / 'results.json').read_text())['step'] == 6
