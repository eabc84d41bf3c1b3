"""`kdflax demo` (what `make demo` runs): the model table, then the whole pipeline.

    kdflax demo [--workdir runs/demo] [--config configs/quickstart.py] [--config.key=value ...]

1. A table of the presets that matter here (params, GMACs, resolution, CPU ms/image on bundled
   leaf photos for the small ones, the maps each model sows for distillation).
2. `kdflax pipeline` on real bean-leaf photos (`configs/quickstart.py`: the whole iBean train
   and val splits at 128 px): the baseline student, the student distilled from an
   EfficientNet-Lite0 fine-tuned from its ImageNet weights (its outputs on the student's
   crops come from the committed teacher cache `results/beans/teacher_cache/`, which is how
   the demo fits in 10 minutes on 2 cores; `--config.teacher.cache=''` fine-tunes and runs
   the teacher here instead), export to `.tflite`, results table.
3. One line comparing the distilled student with the baseline on the validation photos, and
   the mean and spread over seeds of the same recipe (`results/beans/results.json`, one run
   is one seed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kdflax.commands import info
from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.config import load_config, save_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TIMED = ('mobilenetv3_small_050', 'mobilenetv3_small_100', 'mobilenetv3_large_100',
         'efficientnet_lite0')
LISTED = ('swin_tiny_patch4_window7_224', 'swin_large_patch4_window12_384',
          'deit_tiny_patch16_224')
SEEDS_FILE = os.path.join(ROOT, 'results', 'beans', 'results.json')


def verdict(rows: Sequence[Mapping[str, Any]]) -> str:
  """One line: the distilled student's val top-1 against the baseline's (from results rows)."""
  top1 = {r['stage']: r.get('top1') for r in rows}
  base, dist = top1.get('baseline student'), top1.get('distilled student')
  if base is None or dist is None:
    return 'no validation accuracy to compare (config.data.eval_split is empty)'
  delta = 100 * (dist - base)
  if delta == 0:
    return f'distilled student {100 * dist:.1f}% = baseline {100 * base:.1f}% val top-1'
  word = 'above' if delta > 0 else 'BELOW'
  return (f'distilled student {100 * dist:.1f}% vs baseline {100 * base:.1f}% val top-1: '
          f'{abs(delta):.1f} points {word} it')


def seeds_note(path: str = SEEDS_FILE) -> str:
  """Mean +- std of baseline and kd over seeds from a `kdflax matrix` results file."""
  try:
    with open(path) as f:
      summary = json.load(f)['summary']
  except (OSError, ValueError, KeyError):
    return f'no seed summary at {os.path.relpath(path, ROOT)}'
  parts, stats = [], []
  for method, label in (('baseline', 'baseline'), ('kd', 'distilled')):
    stat = summary.get(method, {}).get('val_top1', {})
    if stat.get('mean') is not None:
      parts.append(f'{label} {100 * stat["mean"]:.1f} +- {100 * stat["std"]:.1f}')
      stats.append(stat)
  seeds = summary.get('kd', {}).get('n', 0)
  note = (f'over {seeds} seeds ({os.path.relpath(path, ROOT)}): ' + ', '.join(parts) +
          ' val top-1')
  if len(stats) == 2 and min(summary['baseline'].get('n', 0), seeds) < 2:
    note += ': one seed, no spread to compare with'
  elif len(stats) == 2:  # is the mean difference larger than the larger of the two stds?
    delta = 100 * (stats[1]['mean'] - stats[0]['mean'])
    spread = 100 * max(stats[0]['std'] or 0.0, stats[1]['std'] or 0.0)
    note += (f', {delta:+.1f} points: inside the spread over seeds' if abs(delta) <= spread
             else f', {delta:+.1f} points: more than the spread over seeds')
  return note


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax demo', description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=os.path.join('runs', 'demo'))
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'quickstart.py'))
  args, rest = parse_with_overrides(parser, argv[1:])
  photos = sorted(glob.glob(os.path.join(info.SAMPLE_DIR, '*', '*.jpg')))[::15][:3]
  print('== kdflax models (1000 classes; CPU ms/image measured on bundled leaf photos)')
  rows = [info.describe(name, 1000, True, photos) for name in TIMED]
  rows += [info.describe(name, 1000, False, photos) for name in LISTED]
  print(info.format_table(rows), flush=True)
  print(f'\n== pipeline: {os.path.relpath(args.config, ROOT)} -> {args.workdir}', flush=True)

  def run() -> int:
    from kdflax.pipeline.run import run_pipeline
    config = load_config(args.config, rest)
    save_config(config, args.workdir)
    results = run_pipeline(config, args.workdir)
    print(f'\n== {verdict(results)} (one seed; {seeds_note()})')
    return 0

  return run_reporting_errors('demo', run)
