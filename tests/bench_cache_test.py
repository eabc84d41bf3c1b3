"""tools/bench_cache.py's table: mean ± std over seeds and ratios to the same seed's baseline."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tools'))
import bench_cache  # noqa: E402


def _record(method, seed, top1, loop_s, command_s, cache_s=None):
  record = {'method': method, 'seed': seed, 'final_top1': top1, 'best_top1': top1 + 0.01,
            'loop_s': loop_s, 'command_s': command_s, 'steps': 10}
  if cache_s is not None:
    record['cache_s'] = cache_s
  return record


def test_table_ratios_are_per_seed_against_that_seeds_baseline():
  records = {
      'baseline/seed0': _record('baseline', 0, 0.90, 100.0, 120.0),
      'baseline/seed1': _record('baseline', 1, 0.92, 200.0, 220.0),
      'cache4/seed0': _record('cache4', 0, 0.93, 110.0, 130.0, cache_s=50.0),
      'cache4/seed1': _record('cache4', 1, 0.95, 240.0, 260.0, cache_s=70.0),
  }
  text = bench_cache.table(records, ['baseline', 'live', 'cache4'])
  lines = text.splitlines()
  assert len(lines) == 4  # header, rule, baseline, cache4 (no live rows: no line)
  baseline, cache = lines[2].split(' | '), lines[3].split(' | ')
  assert baseline[2] == '91 ± 1.4' and baseline[7] == '1 ± 0'
  # loop: 110/100 = 1.1 and 240/200 = 1.2; command + build: 180/120 = 1.5, 330/220 = 1.5.
  assert cache[2] == '94 ± 1.4' and cache[6] == '60 ± 14'
  assert cache[7] == '1.15 ± 0.071' and cache[8].rstrip(' |') == '1.5 ± 0'
