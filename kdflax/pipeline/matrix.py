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
# Terms that distil the teacher's logits (CE may be left off beside them).
LOGIT_TERMS = ('kd', 'dkd')
# Terms that compare intermediates need pairs in the config.
NEEDS_PAIRS = ('attention', 'manifold')


def terms_config(config, terms: Sequence[str], seed: int, name: str = ''):
  """A copy of `config` with `terms` on, the others off.

  A term the config leaves at weight 0 gets 1.0, except `ce` beside a logit term (`kd`,
  `dkd`): there 0 means the student learns from the teacher's outputs alone (big_vision's
  function matching), while the baseline and `at` rows still get their labels.
  """
  row = config.copy_and_resolve_references()
  teacher_logits = bool(set(terms) & set(LOGIT_TERMS))
  for term in TERMS:
    section = row.loss[term]
    if term in terms:
      if term in NEEDS_PAIRS and not section.pairs:
        raise ValueError(f'method {name!r} needs config.loss.{term}.pairs')
      if float(section.weight) == 0 and not (term == 'ce' and teacher_logits):
        section.weight = 1.0
    else:
      section.weight = 0.0
  row.seed = int(seed)
  row.export.precisions = ('int8',)
  return row


def method_config(config, method: str, seed: int):
  """A copy of `config` for one row: the method's terms on, the others off, `seed` set."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; known: {", ".join(METHODS)}')
  return terms_config(config, METHODS[method], seed, method)


def seed_cache(config, workdir: str, methods: Sequence[str], seed: int, teacher_dir: str,
               views: int, log: Callable[[str], None]) -> str | None:
  """`WORKDIR/cache_s<seed>`: one teacher cache of `views` views for every method of `seed`.

  It holds what each of `methods` reads from the teacher (logits, and the targets of every
  attention / manifold pair any of them uses), so the teacher runs once per seed instead of
  once per row. None when `views` is 0 or no method has a teacher. Built once; kept.
  """
  from kdflax.train.teacher_cache import MANIFEST
  from kdflax.train.teacher_cache.build import build_cache

  terms = sorted({t for m in methods for t in METHODS[m]})
  if not views or terms == ['ce']:
    return None
  path = os.path.join(workdir, f'cache_s{seed}')
  if not os.path.exists(os.path.join(path, MANIFEST)):
    log(f'[matrix] teacher cache for seed {seed}: {views} views per image, {", ".join(terms)}')
    build_cache(terms_config(config, terms, seed, 'cache'), path, teacher_dir, views=views,
                log_fn=log)
  return path


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
            log: Callable[[str], None], cache: str | None = None) -> dict[str, Any]:
  """Trains, exports and scores one (method, seed); returns its results row.

  With `cache` (a teacher cache of this seed) a method with a teacher distils from it.
  """
  from kdflax.pipeline.run import export_stage
  from kdflax.train.stages import run_stage

  row_config = method_config(config, method, seed)
  if cache and method != 'baseline':
    row_config.teacher.cache = cache
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
  if method == 'baseline':
    teacher = 'none'
  else:
    teacher = 'cache' if row_config.teacher.cache else 'live'
  return {'method': method, 'seed': int(seed), 'teacher': teacher,
          'val_top1': summary.get('best', {}).get('top1'),
          'int8_val_top1': int8.get('top1'),
          'tflite': os.path.join(run_dir, 'export', int8['model']) if int8 else None,
          'int8_detail': int8.get('detail', ''),
          'wall_s': round(time.perf_counter() - start, 1)}


def run_matrix(config, workdir: str, methods: Sequence[str], seeds: Sequence[int],
               log: Callable[[str], None] = print, cache_views: int = 0) -> dict[str, Any]:
  """Every (method, seed) row (see the module docstring); returns the results object.

  With `cache_views` K > 0 the rows of a seed distil from one teacher cache of K views
  (`seed_cache`) instead of running the teacher at every step.
  """
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
    todo = [m for m in methods
            if not os.path.exists(os.path.join(workdir, 'rows', f'{m}_s{seed}.json'))]
    cache = seed_cache(config, workdir, todo, seed, teacher_dir, cache_views, log)
    for method in methods:
      path = os.path.join(workdir, 'rows', f'{method}_s{seed}.json')
      if os.path.exists(path):
        with open(path) as f:
          rows.append(json.load(f))
        log(f'[matrix] {method} seed {seed}: done before ({path})')
        continue
      log(f'[matrix] {method} seed {seed}')
      row = run_row(config, workdir, method, seed, teacher_dir, log, cache)
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
