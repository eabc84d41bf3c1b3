"""Run `.tflite` models in a child process, so an interpreter abort becomes an exception.

The LiteRT interpreter aborts the whole process on some graphs (e.g. full-int8 erf-GELU);
freshly converted models are therefore only ever executed here, never in the caller:

    logits = run_isolated('m.tflite', images)                 # (N, S, S, 3) uint8 -> (N, K)
    stats = benchmark_isolated(['a.tflite', 'b.tflite'], threads=1, runs=20, trials=5)

`benchmark_isolated` loads all the models in one child process (or, with `processes=P`, in P
children with shuffled load orders) and interleaves their timing trials (the order rotates
every trial), so machine noise hits every model alike; it also reports the child's resident
memory before loading and its peak (one model per call gives the interpreter's footprint).

The child is `python -m kdflax.export.isolated run|bench ...` and imports only NumPy and
`ai_edge_litert`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from kdflax.export.child_env import child_env


class InterpreterCrash(RuntimeError):
  """The child process running the interpreter died or failed; the message says how."""


def _run_child(args: list[str], what: str, timeout: float) -> None:
  cmd = [sys.executable, '-m', 'kdflax.export.isolated', *args]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
  except subprocess.TimeoutExpired:
    raise InterpreterCrash(f'{what}: the LiteRT interpreter did not finish within '
                           f'{timeout:.0f} s') from None
  if proc.returncode < 0:
    try:
      name = signal.Signals(-proc.returncode).name
    except ValueError:
      name = f'signal {-proc.returncode}'
    raise InterpreterCrash(f'{what}: the LiteRT interpreter crashed ({name}) running the model; '
                           'some op in the graph has no working kernel at this precision')
  if proc.returncode != 0:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    # A signal delivered to a shell-less child can also show as 128 + signum.
    detail = lines[-1] if lines else f'exit status {proc.returncode}'
    raise InterpreterCrash(f'{what}: running the model failed: {detail}')


def run_isolated(model_path: str | os.PathLike, images: np.ndarray, threads: int = 1,
                 timeout: float = 600) -> np.ndarray:
  """`(N, S, S, 3)` uint8 images -> `(N, K)` float32 logits, computed in a child process.

  Raises:
    InterpreterCrash: the child aborted, timed out or raised.
  """
  model_path = os.fspath(model_path)
  with tempfile.TemporaryDirectory(prefix='kdflax-run-') as tmp:
    src, dst = os.path.join(tmp, 'images.npy'), os.path.join(tmp, 'logits.npy')
    np.save(src, np.asarray(images))
    _run_child(['run', '--model', model_path, '--images', src, '--out', dst,
                '--threads', str(threads)], model_path, timeout)
    return np.load(dst)


def benchmark_isolated(model_paths: Sequence[str | os.PathLike], threads: int = 1,
                       warmup: int = 5, runs: int = 20, trials: int = 1,
                       timeout: float = 600, processes: int = 1, seed: int = 0) -> list[dict]:
  """Times batch invocations of each model in child processes, interleaving trials.

  With `processes > 1` the trials are spread over that many child processes, each loading the
  models in a different (seeded random) order. Where a model's buffers land in memory moves
  its latency by a few percent for the life of a process (two copies of one file in one
  process differ by up to 4% here); several processes average that placement out, so ratios
  between models measure the models.

  Returns:
    One dict per model: `latency_ms` (every timed invoke), `trial_median_ms` (one per trial),
    `median_ms`, `p90_ms`; the same for the child's CPU time per invoke (`cpu_ms`,
    `trial_cpu_median_ms`, `cpu_median_ms`: with 1 thread, the latency without the time the
    OS gave other processes, the robust figure on a shared machine); `rss_before_mb` (child
    before loading anything), `peak_rss_mb` (child's high-water mark after all runs, the
    largest over processes), `threads`, `batch`. Trial `i` of every model comes from the same
    process and round, so per-trial ratios between models are paired.
  """
  paths = [os.fspath(p) for p in model_paths]
  processes = max(1, min(processes, trials))
  rng = np.random.default_rng(seed)
  merged: list[dict] | None = None
  for index in range(processes):
    share = trials // processes + (index < trials % processes)
    order = list(range(len(paths))) if index == 0 else list(rng.permutation(len(paths)))
    with tempfile.TemporaryDirectory(prefix='kdflax-bench-') as tmp:
      out = os.path.join(tmp, 'bench.json')
      args = ['bench', '--out', out, '--threads', str(threads), '--warmup', str(warmup),
              '--runs', str(runs), '--trials', str(share)]
      for i in order:
        args += ['--model', paths[i]]
      _run_child(args, ', '.join(paths), timeout)
      with open(out) as f:
        loaded = json.load(f)
    stats = [None] * len(paths)
    for position, i in enumerate(order):
      stats[i] = loaded[position]
    merged = stats if merged is None else [_merge(a, b) for a, b in zip(merged, stats,
                                                                        strict=True)]
  for s in merged:
    s['median_ms'] = float(np.median(s['latency_ms']))
    s['p90_ms'] = float(np.percentile(s['latency_ms'], 90))
    s['cpu_median_ms'] = float(np.median(s['cpu_ms']))
  return merged


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for key in ('latency_ms', 'trial_median_ms', 'cpu_ms', 'trial_cpu_median_ms'):
    out[key] = a[key] + b[key]
  out['peak_rss_mb'] = max(a['peak_rss_mb'], b['peak_rss_mb'])
  return out


# ---------------------------------------------------------------------------------------------
# Child side.


def _rss_mb() -> float:
  import psutil
  return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
  """This process's resident-set high-water mark.

  Linux: VmHWM, which starts afresh at exec (ru_maxrss does not: a child started from a big
  parent reports the parent's peak).
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**10  # kB
  except OSError:
    pass
  try:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10  # bytes vs KiB
  except ImportError:  # Windows
    import psutil
    return psutil.Process().memory_info().peak_wset / 2**20


def _child_run(args: argparse.Namespace) -> None:
  from kdflax.export.interpreter import TFLiteClassifier
  clf = TFLiteClassifier(args.model[0], num_threads=args.threads)
  logits = clf(np.load(args.images))
  np.save(args.out, logits)


def _child_bench(args: argparse.Namespace) -> None:
  from kdflax.export.interpreter import TFLiteClassifier
  before = _rss_mb()
  rng = np.random.default_rng(0)
  models = []
  for path in args.model:
    clf = TFLiteClassifier(path, num_threads=args.threads)
    clf.set_input(rng.integers(0, 256, (clf.batch, clf.image_size, clf.image_size, 3),
                               dtype=np.uint8))
    for _ in range(args.warmup):
      clf.invoke()
    models.append(clf)
  times: list[list[float]] = [[] for _ in models]
  cpu_times: list[list[float]] = [[] for _ in models]
  trial_medians: list[list[float]] = [[] for _ in models]
  trial_cpu_medians: list[list[float]] = [[] for _ in models]
  for trial in range(args.trials):
    order = list(range(len(models)))
    order = order[trial % len(order):] + order[:trial % len(order)]
    for i in order:
      invoke = models[i].interpreter.invoke
      these, cpu = [], []
      for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        invoke()
        these.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
      times[i] += these
      cpu_times[i] += cpu
      trial_medians[i].append(float(np.median(these)))
      trial_cpu_medians[i].append(float(np.median(cpu)))
  peak = _peak_rss_mb()
  result = [{
      'model': clf.path, 'threads': args.threads, 'batch': clf.batch,
      'latency_ms': t, 'trial_median_ms': tm,
      'median_ms': float(np.median(t)), 'p90_ms': float(np.percentile(t, 90)),
      'cpu_ms': c, 'trial_cpu_median_ms': tc, 'cpu_median_ms': float(np.median(c)),
      'rss_before_mb': before, 'peak_rss_mb': peak,
  } for clf, t, tm, c, tc in zip(models, times, trial_medians, cpu_times, trial_cpu_medians,
                                 strict=True)]
  with open(args.out, 'w') as f:
    json.dump(result, f)


def _main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='python -m kdflax.export.isolated')
  parser.add_argument('mode', choices=('run', 'bench'))
  parser.add_argument('--model', action='append', required=True)
  parser.add_argument('--images')
  parser.add_argument('--out', required=True)
  parser.add_argument('--threads', type=int, default=1)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--runs', type=int, default=20)
  parser.add_argument('--trials', type=int, default=1)
  args = parser.parse_args(argv)
  try:
    (_child_run if args.mode == 'run' else _child_bench)(args)
  except Exception as e:  # reported to the parent as the last stderr line
    print(f'{type(e).__name__}: {e}'.replace('\n', ' '), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(_main(sys.argv[1:]))
