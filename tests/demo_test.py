"""`kdflax demo`'s closing lines: the verdict from the results rows and the seed summary."""

import json

from kdflax.commands import demo
from kdflax.pipeline import matrix


def _rows(base, dist):
  return [{'stage': 'teacher (given)', 'top1': 0.95}, {'stage': 'baseline student', 'top1': base},
          {'stage': 'distilled student', 'top1': dist}]


def test_verdict_says_above_level_or_below():
  assert demo.verdict(_rows(0.9, 0.94)) == (
      'distilled student 94.0% vs baseline 90.0% val top-1: 4.0 points above it')
  assert 'BELOW' in demo.verdict(_rows(0.9, 0.85))
  assert demo.verdict(_rows(0.9, 0.9)) == 'distilled student 90.0% = baseline 90.0% val top-1'
  assert 'no validation accuracy' in demo.verdict(_rows(None, 0.9))


def test_seeds_note_reads_a_matrix_summary(tmp_path):
  rows = [{'method': m, 'seed': s, 'val_top1': v, 'int8_val_top1': None}
          for m, vals in (('baseline', (0.88, 0.9)), ('kd', (0.93, 0.95)))
          for s, v in enumerate(vals)]
  path = tmp_path / 'matrix.json'
  path.write_text(json.dumps({'summary': matrix.summarize(rows)}))
  note = demo.seeds_note(str(path))
  assert 'over 2 seeds' in note and 'baseline 89.0 +- 1.4' in note
  assert note.endswith('distilled 94.0 +- 1.4 val top-1, +5.0 points: more than the spread '
                       'over seeds')
  rows[3]['val_top1'] = 0.87  # kd 0.93, 0.87: mean 90.0 +- 4.2, one point above the baseline
  path.write_text(json.dumps({'summary': matrix.summarize(rows)}))
  assert demo.seeds_note(str(path)).endswith(', +1.0 points: inside the spread over seeds')
  assert 'no seed summary' in demo.seeds_note(str(tmp_path / 'missing.json'))
  one = [r for r in rows if r['seed'] == 0]
  path.write_text(json.dumps({'summary': matrix.summarize(one)}))
  assert demo.seeds_note(str(path)).endswith('val top-1: one seed, no spread to compare with')
