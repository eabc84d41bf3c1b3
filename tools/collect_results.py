"""Gathers `kdflax matrix` workdirs and teacher runs into a results folder that is committed.

    python tools/collect_results.py --out results/beans --recipe configs/beans_pretrained.py \
        --matrix runs/beans/nmatrix --teachers runs/beans/teacher_s0 \
        --teacher_tflite runs/beans/teacher_export/teacher_int8.tflite \
        --commit baseline,kd,hybrid --command 'kdflax matrix ...' --machine 'AMD EPYC, 2 cores'

Writes `OUT/results.json` (recipe, split, machine, command, teacher, rows, summary,
committed) and `OUT/results.md`. The rows come from every `MATRIX/rows/*.json`, ordered as
`kdflax matrix` orders methods, then by seed. For each `--commit` method the int8 `.tflite` of
its first seed (and `--teacher_tflite`) is copied to `OUT/<name>_int8.tflite` with its labels
sidecar and export report; the report's file name is renamed to match and its `eval_source`
made relative to the repository, so `tests/committed_models_test.py` can rescore the file.
Nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kdflax import atomic  # noqa: E402
from kdflax.pipeline.matrix import METHODS, format_summary, summarize  # noqa: E402


def matrix_rows(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """Every finished row of `workdirs`, in `METHODS` order then by seed; a (method, seed)
  found twice is an error, since the table would silently show one of them."""
  rows, seen = [], {}
  for workdir in workdirs:
    for path in sorted(glob.glob(os.path.join(workdir, 'rows', '*.json'))):
      with open(path) as f:
        row = json.load(f)
      key = (row['method'], row['seed'])
      if key in seen:
        raise SystemExit(f'{path}: {key} is also in {seen[key]}; collect one of them')
      seen[key] = path
      rows.append(row)
  order = list(METHODS)
  return sorted(rows, key=lambda r: (order.index(r['method']), r['seed']))


def teacher_summary(workdirs: Sequence[str], model: str, distilled_from_seed: int,
                    command: str) -> dict[str, Any]:
  """Val top-1 (best step) and wall time of each teacher run, with mean and sample std."""
  seeds = []
  for workdir in workdirs:
    with open(os.path.join(workdir, 'results.json')) as f:
      result = json.load(f)
    with open(os.path.join(workdir, 'config.json')) as f:
      seed = json.load(f).get('seed', 0)
    seeds.append({'seed': seed, 'val_top1': result['best']['top1'],
                  'wall_s': result.get('wall_seconds')})
  values = [s['val_top1'] for s in seeds]
  return {'model': model, 'distilled_from_seed': distilled_from_seed, 'seeds': seeds,
          'val_top1_mean': statistics.fmean(values),
          'val_top1_std': statistics.stdev(values) if len(values) > 1 else 0.0,
          'command': command}


def _relative(path: str) -> str:
  path = os.path.abspath(path)
  return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path


def copy_model(tflite: str, out_dir: str, name: str) -> str:
  """Copies `tflite` (+ `.labels.txt`, `.report.json/.md`) to `out_dir/name.*`; the new name."""
  stem, new_stem = tflite[:-len('.tflite')], os.path.join(out_dir, name)
  old_file, new_file = os.path.basename(tflite), name + '.tflite'
  for suffix in ('.tflite', '.labels.txt'):
    if os.path.exists(stem + suffix):
      with open(stem + suffix, 'rb') as f:
        atomic.write_bytes(new_stem + suffix, f.read())
  with open(stem + '.report.json') as f:
    report = json.load(f)
  report['exports'] = [e for e in report['exports'] if e['file'] == old_file]
  for export in report['exports']:
    export['file'] = new_file
  if report.get('eval_source'):
    folder, split = report['eval_source'].rsplit(' ', 1)
    report['eval_source'] = f'{_relative(folder)} {split}'
  atomic.write_json(new_stem + '.report.json', report, indent=1)
  with open(stem + '.report.md') as f:
    text = f.read()
  lines = [line for line in text.splitlines()
           if not line.startswith('| ') or old_file in line or 'precision' in line
           or line.startswith('|---')]
  atomic.write_text(new_stem + '.report.md', '\n'.join(lines).replace(old_file, new_file) + '\n')
  return new_file


def row_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown: one line per row (method, seed, teacher, JAX and int8 top-1, detail, wall)."""
  def pct(value):
    return '-' if value is None else f'{100 * value:.1f}'
  lines = ['| method | seed | teacher | JAX | int8 | int8 detail | wall s |',
           '|---|---:|---|---:|---:|---|---:|']
  for r in rows:
    detail = (r.get('int8_detail') or '').split('; ', 1)[-1].replace('|', '\\|')
    lines.append(f"| {r['method']} | {r['seed']} | {r.get('teacher', '-')} | "
                 f"{pct(r['val_top1'])} | {pct(r.get('int8_val_top1'))} | {detail} | "
                 f"{r.get('wall_s', 0):.0f} |")
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--title', required=True, help='first line of results.md')
  parser.add_argument('--recipe', required=True)
  parser.add_argument('--split', required=True,
                      help='e.g. "val (data/beans_small/val, 133 photos)"')
  parser.add_argument('--matrix', nargs='+', required=True)
  parser.add_argument('--teachers', nargs='+', required=True)
  parser.add_argument('--teacher_model', default='efficientnet_lite0')
  parser.add_argument('--teacher_command', required=True)
  parser.add_argument('--teacher_tflite')
  parser.add_argument('--commit', default='', help='methods whose first-seed int8 file to copy')
  parser.add_argument('--command', required=True)
  parser.add_argument('--machine', required=True)
  parser.add_argument('--note', default='', help='paragraph appended under the summary table')
  args = parser.parse_args(argv)

  rows = matrix_rows(args.matrix)
  if not rows:
    raise SystemExit(f'no rows/*.json under {args.matrix}')
  os.makedirs(args.out, exist_ok=True)
  committed = []
  for method in [m for m in args.commit.split(',') if m]:
    mine = [r for r in rows if r['method'] == method and r.get('tflite')]
    if not mine:
      raise SystemExit(f'--commit {method}: no row of that method has an int8 .tflite')
    committed.append(copy_model(mine[0]['tflite'], args.out, f'{method}_int8'))
  if args.teacher_tflite:
    committed.append(copy_model(args.teacher_tflite, args.out, 'teacher_int8'))

  teacher = teacher_summary(args.teachers, args.teacher_model, 0, args.teacher_command)
  summary = summarize(rows)
  result = {'recipe': args.recipe, 'split': args.split, 'machine': args.machine,
            'command': args.command, 'teacher': teacher,
            'teacher_val_top1': teacher['seeds'][0]['val_top1'], 'rows': rows,
            'summary': summary, 'committed': committed}
  atomic.write_json(os.path.join(args.out, 'results.json'), result, indent=1)
  seeds = ', '.join(f"seed {s['seed']} {100 * s['val_top1']:.1f}" for s in teacher['seeds'])
  text = [f'# {args.title}', '', format_summary(summary), '',
          f'val top-1 in %, mean +- sample std over seeds ({args.split}). Teacher '
          f'{args.teacher_model}: {seeds} (the students distil from seed 0). Machine: '
          f'{args.machine}. Command: `{args.command}`.', '']
  if args.note:
    text += [args.note, '']
  text += [row_table(rows), '']
  if committed:
    text += [f"Committed: {', '.join(committed)} (first seed, labels inside).", '']
  atomic.write_text(os.path.join(args.out, 'results.md'), '\n'.join(text))
  print(f'{args.out}: {len(rows)} rows, committed {committed}')


if __name__ == '__main__':
  main()
