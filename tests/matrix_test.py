"""`kdflax matrix`: method configs, mean +- std, and a tiny resumable run end to end."""

import json
import os
import statistics

import pytest

from kdflax.config import base_config, load_config
from kdflax.pipeline import matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_method_config_switches_terms_and_sets_the_seed():
  config = base_config()
  config.loss.kd.weight = 0.5
  config.loss.attention.pairs = {'s0': {'teacher': 'stage0', 'student': 'stage0'}}
  hybrid = matrix.method_config(config, 'hybrid', 7)
  assert (hybrid.loss.ce.weight, hybrid.loss.kd.weight, hybrid.loss.attention.weight) == (
      1.0, 0.5, 1.0)  # kd keeps the config's weight; attention (0 in config) gets 1.0
  assert hybrid.loss.dkd.weight == hybrid.loss.manifold.weight == 0.0
  assert hybrid.seed == 7 and 'seed' not in hybrid.data  # the run's one seed
  assert tuple(hybrid.export.precisions) == ('int8',)
  baseline = matrix.method_config(config, 'baseline', 1)
  assert baseline.loss.kd.weight == 0.0 and baseline.loss.attention.weight == 0.0
  assert config.loss.attention.weight == 0.0 and config.seed == 0  # the input is not changed


def test_unknown_method_and_missing_pairs_are_clear_errors():
  with pytest.raises(ValueError, match="unknown method 'fitnet'; known: baseline"):
    matrix.method_config(base_config(), 'fitnet', 0)
  with pytest.raises(ValueError, match="method 'at' needs config.loss.attention.pairs"):
    matrix.method_config(base_config(), 'at', 0)


def test_summary_is_mean_and_sample_std_per_method():
  rows = [{'method': 'kd', 'seed': s, 'val_top1': v, 'int8_val_top1': v - 0.01}
          for s, v in enumerate((0.9, 0.8, 0.85))]
  rows.append({'method': 'baseline', 'seed': 0, 'val_top1': 0.7, 'int8_val_top1': None})
  summary = matrix.summarize(rows)
  assert list(summary) == ['kd', 'baseline']
  assert summary['kd']['val_top1']['mean'] == pytest.approx(0.85)
  assert summary['kd']['val_top1']['std'] == pytest.approx(statistics.stdev([0.9, 0.8, 0.85]))
  assert summary['kd']['int8_val_top1']['mean'] == pytest.approx(0.84)
  assert summary['baseline']['val_top1'] == {'mean': 0.7, 'std': 0.0}
  assert summary['baseline']['int8_val_top1']['mean'] is None
  table = matrix.format_summary(summary)
  assert '| kd | 0,1,2 | 85.0 +- 5.0 | 84.0 +- 5.0 |' in table
  assert '| baseline | 0 | 70.0 +- 0.0 | - |' in table


def _tiny_config():
  """tests/configs/tiny.py on the bundled beans sample: 2 steps per stage, int8 export on."""
  overrides = [
      f'--config.data.root={os.path.join(ROOT, "data", "beans_sample")}',
      '--config.model.name=mobilenetv3_small_050', '--config.model.image_size=32',
      '--config.train.num_steps=2', '--config.train.eval_every=2',
      '--config.train.checkpoint_every=2', '--config.teacher.train.num_steps=2',
      '--config.export.enabled=True', '--config.export.calibration_images=8',
      '--config.loss.kd.weight=1.0']
  return load_config(os.path.join(ROOT, 'tests', 'configs', 'tiny.py'), overrides)


def test_tiny_matrix_runs_exports_and_resumes(tmp_path):
  config = _tiny_config()
  workdir = str(tmp_path / 'matrix')
  logs = []
  result = matrix.run_matrix(config, workdir, ['baseline', 'kd'], [0], log=logs.append)
  assert [(r['method'], r['seed']) for r in result['rows']] == [('baseline', 0), ('kd', 0)]
  for row in result['rows']:
    assert 0 <= row['val_top1'] <= 1 and 0 <= row['int8_val_top1'] <= 1
    assert os.path.isfile(row['tflite']) and row['tflite'].endswith('.tflite')
  assert os.path.isdir(os.path.join(workdir, 'teacher', 'model_best'))
  assert 0 <= result['teacher_val_top1'] <= 1
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['rows'] == result['rows']
  assert '| kd | 0 |' in open(os.path.join(workdir, 'results.md')).read()

  logs.clear()
  again = matrix.run_matrix(config, workdir, ['baseline', 'kd'], [0], log=logs.append)
  assert again['rows'] == result['rows']
  assert sum('done before' in line for line in logs) == 2
  assert not any(tag in line for line in logs for tag in ('[distill]', '[student]', '[teacher]'))
  assert again['teacher_val_top1'] == result['teacher_val_top1']


def test_a_cached_matrix_runs_the_teacher_once_per_seed(tmp_path):
  config = _tiny_config()
  workdir = str(tmp_path / 'matrix')
  logs = []
  result = matrix.run_matrix(config, workdir, ['baseline', 'kd', 'dkd'], [0], log=logs.append,
                             cache_views=2)
  assert [(r['method'], r['teacher']) for r in result['rows']] == [
      ('baseline', 'none'), ('kd', 'cache'), ('dkd', 'cache')]
  with open(os.path.join(workdir, 'cache_s0', 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['views'] == 2 and manifest['fingerprint']['seed'] == 0
  assert sum('teacher cache for seed 0' in line for line in logs) == 1
  # Each cached row trained from that cache (the stage logs name it), not the live teacher.
  assert sum(f'from the cache {os.path.join(workdir, "cache_s0")}' in line
             for line in logs) == 2, logs


def test_ce_at_weight_0_stays_off_only_beside_a_logit_term():
  config = base_config()
  config.loss.ce.weight = 0.0
  config.loss.attention.pairs = {'s0': {'teacher': 'stage0', 'student': 'stage0'}}
  weight = {m: matrix.method_config(config, m, 0).loss.ce.weight
            for m in ('baseline', 'kd', 'dkd', 'at', 'hybrid')}
  assert weight == {'baseline': 1.0, 'kd': 0.0, 'dkd': 0.0, 'at': 1.0, 'hybrid': 0.0}
