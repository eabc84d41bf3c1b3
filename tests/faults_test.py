"""The fault-injection suite: each fault a user can meet, run through the `kdflax` command
(mostly in a subprocess, on the tiny config), asserting the one line on stderr, the exit code,
and that nothing that existed before changed. `docs/reliability.md` lists the same cases.

Faults injected into Orbax's save (SIGKILL in the middle of it, a failed commit) go through
`tests/helpers/fault_run.py`.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import data_fixtures as fx

from kdflax import cli
from kdflax.commands import predict
from kdflax.train import checkpoint as model_io
from kdflax.train.loop import committed_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'tests' / 'configs' / 'tiny.py')
FAULT_RUN = str(ROOT / 'tests' / 'helpers' / 'fault_run.py')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}
DATA = f'--config.data.root={fx.BEANS_SAMPLE}'
SHORT = ['--config.train.num_steps=2', '--config.train.eval_every=2']
# Six steps with a checkpoint every two: the run the resume and disk tests start from.
SIX = ['--config.train.num_steps=6', '--config.train.checkpoint_every=2', DATA]


def kdflax(*args: str, fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
  """`python -m kdflax.cli ARGS` (or through `fault_run.py MODE STEP`), as a user runs it."""
  head = ([FAULT_RUN, fault[0], str(fault[1]), '--'] if fault else ['-m', 'kdflax.cli'])
  return subprocess.run([sys.executable, *head, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=600, check=False)


def one_error(proc: subprocess.CompletedProcess, command: str, code: int) -> str:
  """The process exited with `code` and its stderr is exactly one `kdflax COMMAND:` line."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
  assert lines[0].startswith(f'kdflax {command}: '), lines[0]
  return lines[0]


def _one_line(capsys) -> list[str]:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith('kdflax')]
  assert 'Traceback' not in err, err[-2000:]
  return lines


def files(root: pathlib.Path) -> dict[str, bytes]:
  """Every file under `root` with its bytes (to show that a fault changed none of them)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file()}


def final_variables(workdir: pathlib.Path) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(model_io.load_model(
      str(workdir / 'model_final'))[1])]


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> pathlib.Path:
  """A finished six-step tiny student run (checkpoints 2, 4, 6), never modified by a test."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  proc = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SIX)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def earlier_run(finished, tmp_path) -> pathlib.Path:
  """A copy of the finished run, for a test to aim a fault at."""
  return pathlib.Path(shutil.copytree(finished, tmp_path / 'run'))


# --- Config typos ------------------------------------------------------------------------

def test_typo_in_a_config_file_is_one_line_and_changes_nothing(earlier_run, tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from kdflax.config import base_config\n\n\ndef get_config():\n'
                 '  config = base_config()\n  config.train.num_step = 10\n  return config\n')
  before = files(earlier_run)
  line = one_error(kdflax('student', '--config', str(bad), '--workdir', str(earlier_run)),
                   'student', 2)
  assert line == (f"kdflax student: {bad}: unknown config key 'train.num_step' "
                  "(did you mean 'train.num_steps'?)")
  assert files(earlier_run) == before
  fresh = tmp_path / 'fresh'
  one_error(kdflax('student', '--config', str(bad), '--workdir', str(fresh)), 'student', 2)
  assert not fresh.exists()


@pytest.mark.parametrize('flags, message', [
    (['--config.optim.learnin_rate=0.1'], "unknown config key 'optim.learnin_rate'"),
    (['--config.train.num_steps=many'], 'num_steps'),
    (['--config.data.root=/nonexistent/leaves'], '/nonexistent/leaves'),
])
def test_typo_in_a_flag_is_one_line_and_changes_nothing(earlier_run, flags, message):
  before = files(earlier_run)
  line = one_error(kdflax('student', '--config', CONFIG, '--workdir', str(earlier_run), *SIX,
                          *flags), 'student', 2)
  assert message in line, line
  assert files(earlier_run) == before


# --- Data ---------------------------------------------------------------------------------

def test_one_class_data_is_refused(tmp_path):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 3, 'val': 1})
  for name in ('angular_leaf_spot', 'bean_rust'):
    for split in ('train', 'val'):
      shutil.rmtree(root / split / name)
  workdir = tmp_path / 'w'
  line = one_error(kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SHORT,
                          f'--config.data.root={root}'), 'student', 2)
  assert f'{root}' in line and '1 class (healthy)' in line, line
  assert not (workdir / 'config.json').exists() and not (workdir / 'checkpoints').exists()


def test_corrupt_image_in_error_mode_is_one_line(tmp_path, capsys):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 3, 'val': 1})
  bad = sorted((root / 'train' / 'bean_rust').glob('*.jpg'))[0]
  fx.truncate(bad, 0.3)
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(tmp_path / 'w'), *SHORT,
                   f'--config.data.root={root}', '--config.data.on_corrupt=error',
                   '--config.data.cache=False'])
  (line,) = _one_line(capsys)
  assert code == 2 and bad.name in line, line


def test_corrupt_image_in_skip_mode_is_skipped_and_counted(tmp_path, capsys):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 3, 'val': 1})
  bad = sorted((root / 'train' / 'bean_rust').glob('*.jpg'))[0]
  fx.truncate(bad, 0.3)
  workdir = tmp_path / 'w'
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(workdir), *SHORT,
                   f'--config.data.root={root}', '--config.data.cache=False'])
  out = capsys.readouterr().out
  assert code == 0
  assert 'skipped 1 unreadable image(s) (2 time(s) in all' in out and bad.name in out, out[-2000:]
  assert json.loads((workdir / 'results.json').read_text())['corrupt_images'] == 1


# --- Training -----------------------------------------------------------------------------

def _nan_run(workdir: pathlib.Path, *flags: str) -> str:
  """A student run whose SGD learning rate explodes; returns its one stderr line."""
  proc = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), DATA,
                '--config.optim.name=sgd', '--config.optim.learning_rate=1e30',
                '--config.optim.grad_clip_norm=0', *flags)
  return one_error(proc, 'student', 3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Warm-up from 0 makes step 1 a no-op (a good checkpoint), then the learning rate explodes.
  workdir = tmp_path / 'nan'
  line = _nan_run(workdir, '--config.optim.warmup_steps=4')
  assert 'non-finite' in line, line
  steps = committed_steps(str(workdir))
  assert steps and steps[-1] < 12
  assert f'the last good checkpoint (step {steps[-1]}) is kept' in line
  from kdflax.train.loop import checkpoint_manager
  restored = checkpoint_manager(str(workdir), 2).restore(steps[-1])
  floats = [np.asarray(x) for x in jax.tree.leaves(restored)
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert floats and all(np.all(np.isfinite(x)) for x in floats)


def test_nan_loss_before_any_checkpoint_says_so(tmp_path):
  line = _nan_run(tmp_path / 'nan0', '--config.optim.warmup_steps=0',
                  '--config.train.checkpoint_every=50')
  assert 'no checkpoint was written yet' in line and 'step None' not in line, line


@pytest.mark.parametrize('point', ['kill-at-start', 'kill-before-commit'])
def test_sigkill_during_a_save_resumes_bit_identically(finished, tmp_path, point):
  """SIGKILL once Orbax has made `4.orbax-checkpoint-tmp` (nothing written yet), or once
  everything is written but not yet renamed to `4`: the re-run resumes from 2, cleans up the
  temporary folder and ends bit-identical to the uninterrupted run."""
  workdir = tmp_path / 'run'
  killed = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SIX,
                  fault=(point, 4))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert committed_steps(str(workdir)) == [2]
  assert [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.startswith('4.')]
  assert json.loads((workdir / 'results.json').read_text())['step'] == 2

  again = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SIX)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step 2' in again.stdout
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['4', '6']
  for a, b in zip(final_variables(finished), final_variables(workdir), strict=True):
    np.testing.assert_array_equal(a, b)
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines() if 'train/loss' in line]
  assert steps == [1, 2, 3, 4, 5, 6]


def _assert_disk_full_then_resume(workdir: pathlib.Path, proc, tmp_path):
  line = one_error(proc, 'student', 2)
  # The asynchronous checkpoint save or the synchronous `model_best` write, whichever hits the
  # full disk first: both name their folder.
  assert line.startswith((f'kdflax student: saving a checkpoint in {workdir / "checkpoints"} '
                          'failed: ', f'kdflax student: saving the model in {workdir}/model_'))
  assert 'No space left on device' in line and '; stopped at step ' in line, line
  record = json.loads((workdir / 'results.json').read_text())
  assert record['step'] in committed_steps(str(workdir)) and record['step'] >= 2
  assert f'the last committed checkpoint (step {record["step"]}) is kept' in line
  # The same command on a disk with room resumes from that checkpoint and finishes.
  moved = tmp_path / 'moved'
  shutil.copytree(workdir, moved)
  again = kdflax('student', '--config', CONFIG, '--workdir', str(moved), *SIX)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from step {record["step"]}' in again.stdout
  assert json.loads((moved / 'results.json').read_text())['step'] == 6
  assert not list(moved.glob('*.tmp-*'))  # what the failed write left is gone


@pytest.fixture
def small_disk(tmp_path):
  """A 900 KiB tmpfs: room for one tiny checkpoint (~540 KiB) but not two. Skipped where
  mounting is not allowed (no root / no CAP_SYS_ADMIN); the ENOSPC test below runs anywhere."""
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


def test_disk_full_on_a_small_tmpfs(small_disk, tmp_path):
  workdir = small_disk / 'run'
  proc = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SIX)
  _assert_disk_full_then_resume(workdir, proc, tmp_path)


def test_disk_full_in_the_commit_of_a_save(tmp_path):
  """The stand-in that runs anywhere: the commit of checkpoint 4 fails with ENOSPC."""
  workdir = tmp_path / 'run'
  proc = kdflax('student', '--config', CONFIG, '--workdir', str(workdir), *SIX,
                fault=('enospc', 4))
  _assert_disk_full_then_resume(workdir, proc, tmp_path)


def test_truncated_checkpoint_is_one_line_and_the_one_before_it_resumes(earlier_run, tmp_path):
  for blob in (earlier_run / 'checkpoints' / '6').rglob('d/*'):
    if blob.is_file():
      os.truncate(blob, 10)
  kept = {**files(earlier_run / 'checkpoints' / '4'),
          'metrics.jsonl': (earlier_run / 'metrics.jsonl').read_bytes()}
  longer = [*SIX, '--config.train.num_steps=8']
  proc = kdflax('student', '--config', CONFIG, '--workdir', str(earlier_run), *longer)
  line = one_error(proc, 'student', 2)
  assert line.startswith(f'kdflax student: {earlier_run / "checkpoints" / "6"}: the checkpoint '
                         'cannot be read'), line
  assert {**files(earlier_run / 'checkpoints' / '4'),
          'metrics.jsonl': (earlier_run / 'metrics.jsonl').read_bytes()} == kept
  # The advice works: without the damaged folder the run resumes from step 4 and finishes.
  shutil.move(str(earlier_run / 'checkpoints' / '6'), str(tmp_path / 'damaged'))
  done = kdflax('student', '--config', CONFIG, '--workdir', str(earlier_run), *longer)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'resumed from step 4' in done.stdout
  assert json.loads((earlier_run / 'results.json').read_text())['step'] == 8


# --- Paths --------------------------------------------------------------------------------

@pytest.fixture
def read_only(earlier_run):
  """`earlier_run` made read-only: a read-only bind mount as root (root ignores permission
  bits), else the permission bits. Skipped where neither is possible."""
  if os.geteuid() != 0:
    for path in [earlier_run, *earlier_run.rglob('*')]:
      path.chmod(path.stat().st_mode & ~0o222)
    yield earlier_run
    for path in [earlier_run, *earlier_run.rglob('*')]:
      path.chmod(path.stat().st_mode | 0o200)
    return
  for command in (['mount', '--bind', str(earlier_run), str(earlier_run)],
                  ['mount', '-o', 'remount,ro,bind', str(earlier_run)]):
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode:
      subprocess.run(['umount', str(earlier_run)], check=False)
      pytest.skip(f'cannot make a read-only bind mount: {done.stderr.decode().strip()}')
  try:
    yield earlier_run
  finally:
    subprocess.run(['umount', str(earlier_run)], check=False)


def test_read_only_workdir(read_only):
  before = files(read_only)
  longer = [*SIX, '--config.train.num_steps=8']
  line = one_error(kdflax('student', '--config', CONFIG, '--workdir', str(read_only), *longer),
                   'student', 2)
  assert str(read_only) in line, line
  assert line.endswith(('Read-only file system', 'Permission denied')), line
  assert files(read_only) == before
  # Under a read-only folder, a new workdir cannot be made either.
  line = one_error(kdflax('student', '--config', CONFIG, '--workdir', str(read_only / 'new'),
                          *SIX), 'student', 2)
  assert str(read_only / 'new') in line, line


def test_workdir_that_is_a_file(tmp_path, capsys):
  workdir = tmp_path / 'run'
  workdir.write_text('my notes')
  code = cli.main(['student', '--config', CONFIG, '--workdir', str(workdir), *SHORT, DATA])
  (line,) = _one_line(capsys)
  assert code == 2 and str(workdir) in line, line
  assert workdir.read_text() == 'my notes'


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


# --- Models -------------------------------------------------------------------------------

def test_truncated_tflite_is_one_line_and_the_intact_file_still_works(tiny_tflite, leaf_photo,
                                                                      tmp_path):
  bad = tmp_path / 'student.tflite'
  bad.write_bytes(tiny_tflite[1][:len(tiny_tflite[1]) * 2 // 3])
  proc = kdflax('predict', '--model', str(bad), str(leaf_photo), '--no-progress')
  line = one_error(proc, 'predict', 2)
  assert proc.stdout == '' and line.startswith(f'kdflax predict: error: {bad} is truncated: ')
  good = tmp_path / 'good.tflite'
  good.write_bytes(tiny_tflite[1])
  assert predict.main(['predict', '--model', str(good), str(leaf_photo), '--no-progress']) == 0
