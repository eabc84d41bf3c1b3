"""tools/collect_results.py: rows from several matrix workdirs in matrix order, the teacher's
seeds, and committed copies whose report names the copy and a repository-relative eval folder."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
import collect_results  # noqa: E402


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def _row(workdir, method, seed, top1, tflite=None):
  _write(os.path.join(workdir, 'rows', f'{method}_s{seed}.json'),
         {'method': method, 'seed': seed, 'teacher': 'cache', 'val_top1': top1,
          'int8_val_top1': top1 - 0.01, 'tflite': tflite,
          'int8_detail': '0.8 MB; int8 parity ok', 'wall_s': 10.0})


def _export(folder):
  os.makedirs(folder)
  stem = os.path.join(folder, 'mobilenet_int8')
  with open(stem + '.tflite', 'wb') as f:
    f.write(b'model bytes')
  with open(stem + '.labels.txt', 'w') as f:
    f.write('a\nb\n')
  report = {'eval_source': f'{ROOT}/data/beans_small val',
            'exports': [{'file': 'mobilenet_fp32.tflite', 'precision': 'fp32'},
                        {'file': 'mobilenet_int8.tflite', 'precision': 'int8'}]}
  _write(stem + '.report.json', report)
  with open(stem + '.report.md', 'w') as f:
    f.write('# r\n\n| precision | file |\n|---|---|\n| fp32 | `mobilenet_fp32.tflite` |\n'
            '| int8 | `mobilenet_int8.tflite` |\n')
  return stem + '.tflite'


def _teacher(workdir, seed, top1):
  _write(os.path.join(workdir, 'results.json'), {'best': {'top1': top1}, 'wall_seconds': 5.0})
  _write(os.path.join(workdir, 'config.json'), {'seed': seed})


def _args(tmp_path, matrices, commit='hybrid'):
  return ['--out', str(tmp_path / 'out'), '--title', 't', '--recipe', 'r.py', '--split', 'val',
          '--matrix', *matrices, '--teachers', str(tmp_path / 't0'), str(tmp_path / 't1'),
          '--teacher_command', 'kdflax teacher', '--commit', commit, '--command', 'kdflax matrix',
          '--machine', 'm']


def test_rows_merge_in_matrix_order_and_the_copy_names_itself(tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _row(a, 'hybrid', 1, 0.95)
  _row(b, 'hybrid', 0, 0.96, tflite=_export(str(tmp_path / 'exp')))
  _row(b, 'baseline', 0, 0.94)
  _teacher(str(tmp_path / 't0'), 0, 0.97)
  _teacher(str(tmp_path / 't1'), 1, 0.95)
  collect_results.main(_args(tmp_path, [a, b]))

  out = tmp_path / 'out'
  result = json.loads((out / 'results.json').read_text())
  assert [(r['method'], r['seed']) for r in result['rows']] == [
      ('baseline', 0), ('hybrid', 0), ('hybrid', 1)]
  assert result['summary']['hybrid']['val_top1']['mean'] == pytest.approx(0.955)
  assert result['teacher']['val_top1_mean'] == pytest.approx(0.96)
  assert result['teacher_val_top1'] == 0.97 and result['committed'] == ['hybrid_int8.tflite']
  assert (out / 'hybrid_int8.tflite').read_bytes() == b'model bytes'
  assert (out / 'hybrid_int8.labels.txt').read_text() == 'a\nb\n'
  report = json.loads((out / 'hybrid_int8.report.json').read_text())
  assert report['eval_source'] == 'data/beans_small val'
  assert [e['file'] for e in report['exports']] == ['hybrid_int8.tflite']
  md = (out / 'hybrid_int8.report.md').read_text()
  assert '`hybrid_int8.tflite`' in md and 'fp32' not in md
  assert '| hybrid | 1 | cache | 95.0 | 94.0 | int8 parity ok | 10 |' in (
      out / 'results.md').read_text()


def test_a_row_in_two_workdirs_and_a_commit_without_a_model_are_refused(tmp_path):
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _row(a, 'kd', 0, 0.95)
  _row(b, 'kd', 0, 0.96)
  _teacher(str(tmp_path / 't0'), 0, 0.97)
  _teacher(str(tmp_path / 't1'), 1, 0.95)
  with pytest.raises(SystemExit, match=r"\('kd', 0\) is also in"):
    collect_results.main(_args(tmp_path, [a, b]))
  with pytest.raises(SystemExit, match='--commit kd: no row'):
    collect_results.main(_args(tmp_path, [a], commit='kd'))
