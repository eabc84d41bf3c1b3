"""The training loop end to end, in subprocesses: exact resume after SIGKILL, multi-host,
NaN guard, and the one-line errors of the CLI."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from kdflax.train import checkpoint as model_io
from kdflax.train.loop import CHECKPOINT_DIR
from kdflax.train.metrics import read_metrics, truncate_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu',
       'PYTHONUNBUFFERED': '1'}


def kdflax(*args, **kwargs) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run(*args, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def _variables(model_dir):
  return jax.tree.leaves(model_io.load_model(model_dir)[1])


def _last_step(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    steps = [json.loads(line)['step'] for line in f if line.strip().endswith('}')]
  return max(steps, default=0)


def _committed_checkpoints(workdir):
  """Steps Orbax has finalised (an async save in flight is a `*.orbax-checkpoint-tmp*` dir)."""
  path = os.path.join(workdir, CHECKPOINT_DIR)
  return [int(n) for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path):
  reference, killed = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  proc = run('student', '--config', CONFIG, '--workdir', reference)
  assert proc.returncode == 0, proc.stderr[-3000:]

  kill_at = random.Random(os.getpid()).randint(2, 10)
  victim = kdflax('student', '--config', CONFIG, '--workdir', killed)
  deadline = time.time() + 600
  # Killed once the run has passed `kill_at` and at least one checkpoint is on disk (the first
  # save may still be in flight when step 2's metrics appear: then there is nothing to resume).
  while ((_last_step(killed) < kill_at or not _committed_checkpoints(killed))
         and victim.poll() is None and time.time() < deadline):
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert not os.path.exists(os.path.join(killed, 'model_final'))

  proc = run('student', '--config', CONFIG, '--workdir', killed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from step' in proc.stdout
  for a, b in zip(_variables(os.path.join(reference, 'model_final')),
                  _variables(os.path.join(killed, 'model_final')), strict=True):
    np.testing.assert_array_equal(a, b)
  # One metrics line per step across the resume, the same steps as the uninterrupted run.
  with open(os.path.join(killed, 'metrics.jsonl')) as f:
    raw = [json.loads(line) for line in f]
  steps = [r['step'] for r in raw if 'train/loss' in r]
  assert steps == sorted(set(steps)) == [r['step'] for r in read_metrics(reference)
                                         if 'train/loss' in r]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
  common = ['--config.train.num_steps=3', '--config.train.eval_every=3']
  port = _free_port()
  workers = [kdflax('student', '--config', CONFIG, '--workdir', two, *common,
                    '--config.distributed.num_processes=2',
                    f'--config.distributed.process_id={i}',
                    f'--config.distributed.coordinator_address=127.0.0.1:{port}')
             for i in range(2)]
  single = run('student', '--config', CONFIG, '--workdir', one, *common)
  outputs = [w.communicate(timeout=600) for w in workers]
  for w, (_, err) in zip(workers, outputs, strict=True):
    assert w.returncode == 0, err[-3000:]
  assert single.returncode == 0, single.stderr[-3000:]
  for a, b in zip(_variables(os.path.join(one, 'model_final')),
                  _variables(os.path.join(two, 'model_final')), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Only process 0 writes metrics (raw lines: read_metrics would merge repeated steps).
  with open(os.path.join(two, 'metrics.jsonl')) as f:
    assert sum('train/loss' in line for line in f) == 3


def test_distill_refuses_a_teacher_with_other_classes(tmp_path):
  from kdflax.models import create_model
  teacher, size = create_model('vit_test_patch8_32', 5)
  variables = jax.jit(teacher.init)(jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  teacher_dir = model_io.save_model(tmp_path / 'teacher', variables, 'vit_test_patch8_32', 5,
                                    size)
  proc = run('distill', '--config', CONFIG, '--workdir', str(tmp_path / 'w'),
             '--teacher_workdir', teacher_dir, '--config.loss.kd.weight=1.0')
  assert proc.returncode == 2
  assert 'has 5 classes but the data' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_bfloat16_compute_with_mixup_soft_labels(tmp_path):
  """bf16 activations, float32 params, and mixup/CutMix soft targets through the whole stack."""
  workdir = str(tmp_path / 'bf16')
  proc = run('student', '--config', CONFIG, '--workdir', workdir,
             '--config.train.compute_dtype=bfloat16', '--config.data.mixup_alpha=0.4',
             '--config.data.cutmix_alpha=1.0', '--config.train.num_steps=3',
             '--config.train.eval_every=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  leaves = _variables(os.path.join(workdir, 'model_final'))
  assert all(x.dtype == np.float32 and np.all(np.isfinite(x)) for x in leaves)
  records = read_metrics(workdir)
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3]


def test_truncate_metrics_drops_what_a_resume_logs_again(tmp_path):
  lines = [json.dumps({'step': s, 'train/loss': 1.0}) for s in (1, 2, 3, 4)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 5, "tra')  # cut
  truncate_metrics(str(tmp_path), 2)
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]
  truncate_metrics(str(tmp_path), 9)
  assert [r['step'] for r in read_metrics(str(tmp_path))] == [1, 2]
  truncate_metrics(str(tmp_path / 'absent'), 0)  # no file: nothing to do


def test_read_metrics_keeps_the_records_of_a_resumed_run(tmp_path):
  # Logged 1..4 (train) and 2, 4 (val), checkpointed at 2, crashed, resumed: 3, 4 again.
  rows = [(1, 'train/loss', 9.0), (2, 'train/loss', 8.0), (2, 'val/top1', 0.1),
          (3, 'train/loss', 7.0), (4, 'train/loss', 6.0), (4, 'val/top1', 0.2),
          (3, 'train/loss', 7.5), (4, 'train/loss', 6.5), (4, 'val/top1', 0.3),
          (5, 'train/loss', 5.0)]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for step, key, value in rows:
      f.write(json.dumps({'step': step, 'time': 0.0, key: value}) + '\n')
  got = [(r['step'], *[(k, v) for k, v in r.items() if k not in ('step', 'time')][0])
         for r in read_metrics(str(tmp_path))]
  assert got == [rows[i] for i in (0, 1, 2, 6, 7, 8, 9)]
  # A crash right after logging step 4 and a resume from 2 whose first log is step 4 again.
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 5, 'time': 0.0, 'train/loss': 4.0}) + '\n')
  assert [r['train/loss'] for r in read_metrics(str(tmp_path)) if r['step'] == 5] == [4.0]
