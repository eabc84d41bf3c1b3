"""Teacher-output cache vs the live teacher on real photos: val top-1 and wall time, one run.

    .venv/bin/python tools/bench_cache.py --config configs/quickstart.py \
        --teacher_workdir runs/demo/teacher --workdir runs/bench_cache \
        [--views 4 8] [--seeds 0 1 2] [--json PATH]

For each seed, one after the other on an otherwise idle machine, through the `kdflax`
command as a user runs it:
  baseline   `kdflax student` (no teacher);
  live       `kdflax distill --teacher_workdir T` (the teacher runs every step);
  cache K    `kdflax cache-teacher --views K` (timed on its own), then `kdflax distill
             --config.teacher.cache=DIR` (no teacher in the step).
Same config, schedule and seed for all. Reported: the val top-1 at the end of the schedule
(`final`; `best`, chosen on val, is in the JSON), the training loop's wall seconds
(`results.json` `wall_seconds`: steps, evaluation, checkpoints) and the whole command's
seconds (with start-up and compilation), and each against the baseline of the same seed.

Resumable: a finished run's record is kept in `WORKDIR/records.json` and not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kdflax import atomic  # noqa: E402


def _kdflax(*args: str) -> float:
  """Runs `python -m kdflax.cli ARGS`; returns its wall seconds (raises on failure)."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, check=False,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if done.returncode:
    raise SystemExit(f'kdflax {" ".join(args)} failed ({done.returncode}): '
                     f'{done.stderr.strip()[-2000:]}')
  return time.perf_counter() - start


def _result(workdir: str) -> dict[str, Any]:
  with open(os.path.join(workdir, 'results.json')) as f:
    summary = json.load(f)
  return {'final_top1': summary['final']['top1'], 'best_top1': summary['best']['top1'],
          'loop_s': summary['wall_seconds'], 'steps': summary['step']}


def run_seed(args: argparse.Namespace, seed: int, records: dict[str, Any],
             save: Callable[[], None]) -> None:
  """The baseline, live and cached runs of one seed (those not in `records` yet)."""
  common = ['--config', args.config, f'--config.seed={seed}', *args.overrides]
  plan = [('baseline', ['student'], None), ('live', ['distill', '--teacher_workdir',
                                                     args.teacher_workdir], None)]
  plan += [(f'cache{k}', ['distill'], k) for k in args.views]
  for method, command, views in plan:
    key = f'{method}/seed{seed}'
    if key in records:
      continue
    workdir = os.path.join(args.workdir, f'{method}_s{seed}')
    record: dict[str, Any] = {'method': method, 'seed': seed}
    extra = []
    if views is not None:
      cache = os.path.join(args.workdir, f'cache_k{views}_s{seed}')
      record['cache_s'] = _kdflax('cache-teacher', *common, '--teacher_workdir',
                                  args.teacher_workdir, '--out', cache, '--views', str(views))
      extra = [f'--config.teacher.cache={cache}']
    record['command_s'] = _kdflax(command[0], *command[1:], *common, '--workdir', workdir,
                                  *extra)
    record.update(_result(workdir))
    records[key] = record
    save()
    print(f'{key}: {record}', flush=True)


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f'{values[0]:.4g}'
  return f'{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}'


def table(records: dict[str, Any], methods: list[str]) -> str:
  """One row per method: val top-1 (mean ± std over seeds), times and ratios to baseline."""
  lines = ['| method | seeds | val top-1 (final) | val top-1 (best) | loop s | command s '
           '| cache build s | loop / baseline | command (+ build) / baseline |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for method in methods:
    rows = [r for r in records.values() if r['method'] == method]
    if not rows:
      continue
    ratios, totals = [], []
    for r in rows:
      base = records.get(f'baseline/seed{r["seed"]}')
      if base:
        ratios.append(r['loop_s'] / base['loop_s'])
        totals.append((r['command_s'] + r.get('cache_s', 0.0)) / base['command_s'])
    build = [r['cache_s'] for r in rows if 'cache_s' in r]
    lines.append(
        f"| {method} | {len(rows)} | {_mean_std([100 * r['final_top1'] for r in rows])} "
        f"| {_mean_std([100 * r['best_top1'] for r in rows])} "
        f"| {_mean_std([r['loop_s'] for r in rows])} "
        f"| {_mean_std([r['command_s'] for r in rows])} "
        f"| {_mean_std(build) if build else '-'} "
        f"| {_mean_std(ratios) if ratios else '-'} | {_mean_std(totals) if totals else '-'} |")
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--teacher_workdir', required=True,
                      help='a trained teacher (e.g. runs/demo/teacher from make demo)')
  parser.add_argument('--workdir', default='runs/bench_cache')
  parser.add_argument('--views', type=int, nargs='+', default=[4, 8])
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--json', metavar='PATH', help='also write the records and table here')
  args, args.overrides = parser.parse_known_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  path = os.path.join(args.workdir, 'records.json')
  records = {}
  if os.path.exists(path):
    with open(path) as f:
      records = json.load(f)

  def save():
    atomic.write_json(path, records, indent=1)

  for seed in args.seeds:
    run_seed(args, seed, records, save)
  methods = ['baseline', 'live', *[f'cache{k}' for k in args.views]]
  text = table(records, methods)
  print(text)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic.write_json(args.json, {'config': args.config, 'overrides': args.overrides,
                                  'records': records, 'table': text}, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
