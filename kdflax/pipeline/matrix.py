"""Every distillation method x seed on one config, exported, with mean +- std.

    result = run_matrix(config, 'runs/beans_matrix', ['baseline', 'kd'], [0, 1, 2])

See `kdflax matrix --help` (`kdflax/commands/matrix.py`) for what a row is; rows are stored in
`WORKDIR/rows/` as they finish and never retrained.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kdflax import atomic

# Method -> the loss terms switched on (all others get weight 0).
METHODS: dict[str, tuple[str, ...]] = {
    'baseline': ('ce',),
    'kd': ('ce', 'kd'),
    'at': ('ce', 'attention'),
    'dkd': ('ce', 'dkd'),
    'hybrid': ('ce', 'kd', 'attention'),
    'manifold': ('ce', 'kd', 'manifold'),
    'hybrid_manifold': ('ce', 'kd', 'attention', 'manifold'),
}
TERMS = ('ce', 'kd', 'dkd', 'hard', 'attention', 'manifold')
# Terms that compare intermediates need pairs in the config.
NEEDS_PAIRS = ('attention', 'manifold')


def method_config(config, method: str, seed: int):
  """A copy of `config` for one row: the method's terms on, the others off, `seed` set."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; known: {", ".join(METHODS)}')
  row = config.copy_and_resolve_references()
  for term in TERMS:
    section = row.loss[term]
    if term in METHODS[method]:
      if term in NEEDS_PAIRS and not section.pairs:
        raise ValueError(f'method {method!r} needs config.loss.{term}.pairs')
      if float(section.weight) == 0:
        section.weight = 1.0
    else:
      section.weight = 0.0
  row.seed = int(seed)
  row.export.precisions = ('int8',)
  return row


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per method: n, mean and (sample) std of `val_top1` and `int8_val_top1`, in rows' order."""
  out: dict[str, dict[str, Any]] = {}
  for method in dict.fromkeys(r['method'] for r in rows):
    mine = [r for r in rows if r['method'] == method]
    entry: dict[str, Any] = {'n': len(mine), 'seeds': [r['seed'] for r in mine]}
    for key in ('val_top1', 'int8_val_top1'):
      values = [r[key] for r in mine if r.get(key) is not None]
      entry[key] = {'mean': statistics.fmean(values) if values else None,
                    'std': statistics.stdev(values) if len(values) > 1 else 0.0}
    out[method] = entry
  return out


def format_summary(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown table: method, seeds, val top-1 mean +- std (JAX and int8), in points."""

  def cell(stat):
    if stat['mean'] is None:
      return '-'
    return f'{100 * stat["mean"]:.1f} +- {100 * stat["std"]:.1f}'

  lines = ['| method | seeds | val top-1 (JAX) | val top-1 (int8 .tflite) |',
           '|---|---|---:|---:|']
  for method, entry in summary.items():
    lines.append(f'| {method} | {",".join(map(str, entry["seeds"]))} | '
                 f'{cell(entry["val_top1"])} | {cell(entry["int8_val_top1"])} |')
  return '\n'.join(lines)


def run_row(config, workdir: str, method: str, seed: int, teacher_dir: str,
            log: Callable[[str], None]) -> dict[str, Any]:
  """Trains, exports and scores one (method, seed); returns its results row."""
  from kdflax.pipeline.run import export_stage
  from kdflax.train.stages import run_stage

  row_config = method_config(config, method, seed)
  name = f'{method}_s{seed}'
  run_dir = os.path.join(workdir, name)
  start = time.perf_counter()
  if method == 'baseline':
    summary = run_stage(row_config, run_dir, 'student', log_fn=log)
  else:
    summary = run_stage(row_config, run_dir, 'distill', teacher_dir=teacher_dir, log_fn=log)
  exported = export_stage(row_config, summary['model_dir'], os.path.join(run_dir, 'export'),
                          log)
  int8 = next((r for r in exported if 'int8' in r['stage']), {})
  return {'method': method, 'seed': int(seed),
          'val_top1': summary.get('best', {}).get('top1'),
          'int8_val_top1': int8.get('top1'),
          'tflite': os.path.join(run_dir, 'export', int8['model']) if int8 else None,
          'int8_detail': int8.get('detail', ''),
          'wall_s': round(time.perf_counter() - start, 1)}


def run_matrix(config, workdir: str, methods: Sequence[str], seeds: Sequence[int],
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every (method, seed) row (see the module docstring); returns the results object."""
  from kdflax.train.stages import run_stage

  for method in methods:
    method_config(config, method, 0)  # unknown methods / missing pairs fail before training
  os.makedirs(os.path.join(workdir, 'rows'), exist_ok=True)
  teacher_dir, teacher_top1 = config.teacher.checkpoint, None
  if not teacher_dir and any(m != 'baseline' for m in methods):
    path = os.path.join(workdir, 'rows', 'teacher.json')
    if os.path.exists(path):
      with open(path) as f:
        teacher = json.load(f)
    else:
      summary = run_stage(config, os.path.join(workdir, 'teacher'), 'teacher', log_fn=log)
      teacher = {'model_dir': summary['model_dir'], 'model': summary['model'],
                 'val_top1': summary.get('best', {}).get('top1')}
      atomic.write_json(path, teacher)
    teacher_dir, teacher_top1 = teacher['model_dir'], teacher['val_top1']
  rows = []
  for seed in seeds:
    for method in methods:
      path = os.path.join(workdir, 'rows', f'{method}_s{seed}.json')
      if os.path.exists(path):
        with open(path) as f:
          rows.append(json.load(f))
        log(f'[matrix] {method} seed {seed}: done before ({path})')
        continue
      log(f'[matrix] {method} seed {seed}')
      row = run_row(config, workdir, method, seed, teacher_dir, log)
      atomic.write_json(path, row)
      rows.append(row)
  summary = summarize(rows)
  result = {'config': config.to_dict().get('data', {}).get('root', ''),
            'teacher': teacher_dir, 'teacher_val_top1': teacher_top1, 'rows': rows,
            'summary': summary}
  atomic.write_json(os.path.join(workdir, 'results.json'), result)
  table = format_summary(summary)
  teacher_note = f' ({100 * teacher_top1:.1f}% val top-1)' if teacher_top1 is not None else ''
  atomic.write_text(os.path.join(workdir, 'results.md'),
                    f'# kdflax matrix\n\n{table}\n\nval top-1 in %, mean +- sample std over '
                    f'seeds; teacher {teacher_dir}{teacher_note}\n')
  log(f'\n{table}')
  return result
