"""Ctrl-C, preemption and a second run on the same workdir (part of the fault suite;
`docs/reliability.md`, "Interrupts, preemption and the workdir lock").

Runs are real `kdflax` subprocesses on the tiny config, paused at a known step by
`tests/helpers/signal_run.py` so that a signal lands where the test says. A process started in
the background by a non-interactive shell inherits SIGINT as ignored: the children are started
with the default handler, as a terminal's Ctrl-C would find them.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import data_fixtures as fx

from kdflax import cli
from kdflax.train import checkpoint as model_io
from kdflax.train import workdir_lock
from kdflax.train.checkpoint import checkpoint_manager, committed_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'tests' / 'configs' / 'tiny.py')
SIGNAL_RUN = str(ROOT / 'tests' / 'helpers' / 'signal_run.py')
pytestmark = pytest.mark.filterwarnings('ignore:os.fork:RuntimeWarning')  # preexec_fn, then exec
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu',
       'PYTHONUNBUFFERED': '1'}
DATA = f'--config.data.root={fx.BEANS_SAMPLE}'
# 12 steps, eval at 6 and 12, no periodic checkpoint before the end: whatever a signal's
# checkpoint saves is all that is kept.
FLAGS = [DATA, '--config.train.checkpoint_every=50']


def student_args(workdir: pathlib.Path, *flags: str) -> list[str]:
  return ['student', '--config', CONFIG, '--workdir', str(workdir), *FLAGS, *flags]


def start(args: list[str], pause_at: int, marker: pathlib.Path,
          hang_commit: bool = False) -> subprocess.Popen:
  """`kdflax ARGS` pausing after step `pause_at` (SIGINT at its default, as in a terminal)."""
  head = [SIGNAL_RUN, str(pause_at), str(marker), *(['--hang-commit'] * hang_commit), '--']
  return subprocess.Popen([sys.executable, *head, *args], cwd=ROOT, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not path.exists():
    if proc.poll() is not None:
      raise AssertionError(f'exited {proc.returncode} before {path.name}: '
                           f'{proc.stderr.read()[-3000:]}')
    assert time.time() < deadline, f'no {path.name} after {timeout} s'
    time.sleep(0.02)


def finish(proc: subprocess.Popen, code: int) -> tuple[str, str]:
  """`(stdout, the one stderr line)` of `proc`, which must exit with `code`."""
  out, err = proc.communicate(timeout=300)
  lines = err.strip().splitlines()
  assert proc.returncode == code and len(lines) == 1, (proc.returncode, err[-3000:])
  return out, lines[0]


def run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600, check=False)


def files(root: pathlib.Path) -> dict[str, bytes]:
  """Every file under `root` but TensorBoard's (its writer flushes on a timer of its own)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
          if p.is_file() and 'tensorboard' not in p.parts}


def final_variables(workdir: pathlib.Path) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(model_io.load_model(
      str(workdir / 'model_final'))[1])]


def train_steps(workdir: pathlib.Path) -> list[int]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line)['step'] for line in lines if 'train/loss' in line]


def dead_pid() -> int:
  child = subprocess.Popen(['true'])
  child.wait()
  return child.pid


def test_sigint_then_sigterm_then_resume_is_exact(tmp_path, capsys):
  """Ctrl-C after step 7, SIGTERM after step 10, then the same command: each stop commits
  its step (no periodic checkpoint would have), and the end equals the uninterrupted run
  (trained beside it). While the first run holds the workdir, a second one is refused and
  `eval` still works."""
  reference, workdir = tmp_path / 'reference', tmp_path / 'run'
  uninterrupted = subprocess.Popen([sys.executable, '-m', 'kdflax.cli', *student_args(reference)],
                                   cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
  resume = f'resume with: kdflax {" ".join(student_args(workdir))}'
  victim = start(student_args(workdir), 7, tmp_path / 'at7')
  wait_for(tmp_path / 'at7', victim)
  before = files(workdir)
  assert cli.main(student_args(workdir)) == 4
  (line,) = [x for x in capsys.readouterr().err.splitlines() if x]
  assert line.startswith(f'kdflax student: {workdir}: in use by another run: pid {victim.pid} '
                         f'on host {socket.gethostname()} since '), line
  assert files(workdir) == before and 'kdflax.lock' in before
  assert cli.main(['eval', '--model', str(workdir), '--config', CONFIG, DATA]) == 0
  victim.send_signal(signal.SIGINT)
  _, line = finish(victim, 130)
  assert line == (f'kdflax student: stopped by SIGINT at step 7 of 12 (stage student); '
                  f'checkpoint {workdir}/checkpoints/7 committed; {resume}')
  assert committed_steps(str(workdir)) == [7] and not (workdir / 'kdflax.lock').exists()
  assert json.loads((workdir / 'results.json').read_text())['step'] == 7

  victim = start(student_args(workdir), 10, tmp_path / 'at10')
  wait_for(tmp_path / 'at10', victim)
  victim.send_signal(signal.SIGTERM)
  out, line = finish(victim, 143)
  assert 'resumed from step 7' in out
  assert line.startswith('kdflax student: stopped by SIGTERM at step 10 of 12 (stage student); '
                         f'checkpoint {workdir}/checkpoints/10 committed; '), line
  assert committed_steps(str(workdir)) == [7, 10]

  # A lock left by a process that died (SIGKILL, a crash) on this host is taken over.
  gone = dead_pid()
  (workdir / 'kdflax.lock').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': gone, 'start': 'earlier', 'command': 'x'}))
  done = run(student_args(workdir))
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stderr.strip() == (f'kdflax student: {workdir}: took over the lock of pid {gone} '
                                 f'on host {socket.gethostname()} since earlier (x), no longer '
                                 'running')
  assert 'resumed from step 10' in done.stdout and not (workdir / 'kdflax.lock').exists()
  _, err = uninterrupted.communicate(timeout=600)
  assert uninterrupted.returncode == 0, err[-3000:]
  for a, b in zip(final_variables(reference), final_variables(workdir), strict=True):
    np.testing.assert_array_equal(a, b)
  assert train_steps(workdir) == train_steps(reference) == list(range(1, 13))


def test_second_signal_during_the_save_stops_at_once(tmp_path):
  """SIGINT after step 5, then SIGINT again while checkpoint 5 is being committed: the process
  exits at once; checkpoint 4 (committed before) is intact, 5 stays an uncommitted temporary
  folder (the next run removes it), the lock is released."""
  workdir = tmp_path / 'run'
  args = student_args(workdir, '--config.train.checkpoint_every=4')
  victim = start(args, 5, tmp_path / 'at5', hang_commit=True)
  wait_for(tmp_path / 'at5', victim)
  victim.send_signal(signal.SIGINT)
  wait_for(tmp_path / 'at5.saving', victim)
  sent = time.time()
  victim.send_signal(signal.SIGINT)
  _, line = finish(victim, 130)
  assert time.time() - sent < 10
  assert line == (f'kdflax student: second SIGINT while stopping after step 5: stopped at once; '
                  f'the last committed checkpoint ({workdir}/checkpoints/4) is kept; resume '
                  f'with: kdflax {" ".join(args)}')
  assert committed_steps(str(workdir)) == [4]
  assert [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.startswith('5.')]
  assert not (workdir / 'kdflax.lock').exists()
  restored = checkpoint_manager(str(workdir), 2).restore(4)
  assert int(restored['step']) == 4


def test_every_process_stops_at_the_same_step(tmp_path):
  """Two processes (one host, CPU collectives): SIGTERM to process 1 only. JAX's preemption
  service agrees on a step; both save that one checkpoint, each prints its line, exit 143."""
  workdir = tmp_path / 'run'
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  markers = [tmp_path / f'at3_{i}' for i in range(2)]
  procs = [start(student_args(workdir, '--config.train.num_steps=400',
                              '--config.train.eval_every=400',
                              '--config.distributed.num_processes=2',
                              f'--config.distributed.process_id={i}',
                              f'--config.distributed.coordinator_address=127.0.0.1:{port}'),
                 3, markers[i]) for i in range(2)]
  for proc, marker in zip(procs, markers, strict=True):
    wait_for(marker, proc)
  procs[1].send_signal(signal.SIGTERM)  # caught by JAX's notifier, not by Python
  time.sleep(0.2)
  for marker in markers:
    pathlib.Path(f'{marker}.go').write_text('go')
  lines = [finish(proc, 143)[1] for proc in procs]
  step = committed_steps(str(workdir))[-1]
  # The notice reaches the processes while they are held at step 3: the step they agree on
  # may be that one (seen on a loaded machine) or a later one, but it is one step for both.
  assert 3 <= step < 400 and committed_steps(str(workdir)) == [step]
  for line in lines:
    assert line.startswith('kdflax student: stopped with the other processes on a preemption '
                           f'notice (SIGTERM) at step {step} of 400 (stage student); '
                           f'checkpoint {workdir}/checkpoints/{step} committed; '), line
  assert not (workdir / 'kdflax.lock').exists()


def _lock(workdir: pathlib.Path, **holder) -> dict:
  workdir.mkdir(parents=True, exist_ok=True)
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': 'earlier',
            'command': 'kdflax student ...', **holder}
  (workdir / 'kdflax.lock').write_text(json.dumps(record))
  return record


def test_lock_holders(tmp_path):
  """Live on this host: refused; dead or its pid reused: taken over with one line; another
  host: refused naming --force_unlock, which takes it, or taken over once its heartbeat has
  stopped; inside a locked workdir: refused."""
  notes = []
  live = tmp_path / 'live'
  _lock(live, process_start=workdir_lock._process_start(os.getpid()))
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f'in use by another run: pid '
                     f'{os.getpid()} on host'):
    workdir_lock.acquire(str(live), 'kdflax student', note=notes.append)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=f'inside {live}, in use'):
    workdir_lock.acquire(str(live / 'student'), 'kdflax student', note=notes.append)
  assert notes == []

  for name, holder in (('dead', {'pid': dead_pid()}), ('reused', {'process_start': '1'})):
    workdir = tmp_path / name
    _lock(workdir, **holder)
    record = workdir_lock.acquire(str(workdir), 'kdflax student', note=notes.append)
    assert notes.pop().startswith(f'{workdir}: took over the lock of pid ')
    assert json.loads((workdir / 'kdflax.lock').read_text())['token'] == record['token']
    workdir_lock.release(str(workdir), record)
    assert not (workdir / 'kdflax.lock').exists()

  other = tmp_path / 'other'
  held = _lock(other, host='colab-runtime-1', pid=1)
  with pytest.raises(workdir_lock.WorkdirLockedError, match='re-run with --force_unlock'):
    workdir_lock.acquire(str(other), 'kdflax student', note=notes.append)
  assert json.loads((other / 'kdflax.lock').read_text()) == held
  record = workdir_lock.acquire(str(other), 'kdflax student', force=True, note=notes.append)
  assert notes.pop() == (f'{other}: took over the lock of pid 1 on host colab-runtime-1 since '
                         'earlier (kdflax student ...) (--force_unlock)')
  workdir_lock.release(str(other), record)
  # A preempted Colab runtime's lock on Drive: another host, no heartbeat for 10 minutes.
  _lock(other, host='colab-runtime-1', pid=1)
  os.utime(other / 'kdflax.lock', (time.time() - 600,) * 2)
  record = workdir_lock.acquire(str(other), 'kdflax student', note=notes.append)
  assert notes == [f'{other}: took over the lock of pid 1 on host colab-runtime-1 since '
                   'earlier (kdflax student ...), no heartbeat for 10 min']
  workdir_lock.release(str(other), record)


def test_other_host_lock_through_the_cli(tmp_path, capsys):
  """A workdir locked from another host: one line naming --force_unlock, exit 4, nothing
  written."""
  workdir = tmp_path / 'run'
  _lock(workdir, host='colab-runtime-1', pid=1)
  before = files(workdir)
  assert cli.main(student_args(workdir)) == 4
  (line,) = [x for x in capsys.readouterr().err.splitlines() if x]
  assert line.startswith(f'kdflax student: {workdir}: in use by another run: pid 1 on host '
                         'colab-runtime-1 since earlier'), line
  assert line.endswith('re-run with --force_unlock'), line
  assert files(workdir) == before


def _signal_self(signum: int):
  """A stand-in for a long piece of work that is signalled while it runs."""
  def work(*args, **kwargs):
    os.kill(os.getpid(), signum)
    time.sleep(30)  # the handler raises before this ends
    raise AssertionError('the signal did not stop the work')
  return work


def test_cache_teacher_and_export_stop_with_one_line(tmp_path, monkeypatch, capsys):
  """Outside a training loop a signal stops the command at once: one line, 130 / 143; the
  cache build's partial folder is removed."""
  from kdflax.commands import export
  from kdflax.train.teacher_cache import build

  handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  out = tmp_path / 'cache'
  partial = pathlib.Path(f'{out}.partial-{os.getpid()}')

  def build_cache(config, directory, **kwargs):
    partial.mkdir()
    _signal_self(signal.SIGINT)()

  monkeypatch.setattr(build, 'build_cache', build_cache)
  code = cli.main(['cache-teacher', '--config', CONFIG, '--out', str(out), DATA])
  (line,) = [x for x in capsys.readouterr().err.splitlines() if x]
  assert code == 130 and line == (f'kdflax cache-teacher: stopped by SIGINT; {out} was not '
                                  'written (a build is all or nothing; its partial folder is '
                                  'removed); build it again with the same command'), line
  assert not partial.exists() and not out.exists()

  monkeypatch.setattr(export, '_run', _signal_self(signal.SIGTERM))
  code = cli.main(['export', '--model', 'mobilenetv3_small_050', '--num_classes', '3',
                   '--out', str(tmp_path / 'm.tflite')])
  (line,) = [x for x in capsys.readouterr().err.splitlines() if x]
  assert code == 143 and line == ('kdflax export: stopped by SIGTERM; the .tflite under way was '
                                  'not written (each file is written whole or not at all)'), line
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_a_pipeline_stage_is_named_by_its_folder(tmp_path):
  from kdflax.commands.common import interrupted_line
  from kdflax.train.interrupt import TrainingInterrupted
  error = TrainingInterrupted(signal.SIGTERM, 30, 100, str(tmp_path / 'distill'),
                              str(tmp_path / 'distill' / 'checkpoints' / '30'))
  error.command, error.resume, error.top_workdir = 'pipeline', 'kdflax pipeline ...', str(tmp_path)
  assert interrupted_line(error) == (
      f'stopped by SIGTERM at step 30 of 100 (stage distill); checkpoint {tmp_path}/distill/'
      'checkpoints/30 committed; resume with: kdflax pipeline ...')
