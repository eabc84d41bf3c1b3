"""Model directories: round trip, atomic replacement, clear errors."""

import json

import jax
import numpy as np
import pytest

from kdflax.train import checkpoint
from kdflax.train.checkpoint import load_model, read_model_info, save_model


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  return {'params': {'conv': {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                     'head': {'bias': rng.normal(size=(2,)).astype(np.float32)}},
          'batch_stats': {'bn': {'mean': rng.normal(size=(4,)).astype(np.float32)}}}


def test_round_trip(tmp_path):
  variables = _variables()
  save_model(tmp_path / 'm', variables, 'mobilenetv3_small_050', 2, 64, ['a', 'b'],
             {'drop_rate': 0.1})
  info, loaded = load_model(tmp_path / 'm')
  assert info.model == 'mobilenetv3_small_050' and info.labels == ('a', 'b')
  assert info.overrides == {'drop_rate': 0.1} and info.image_size == 64
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)


def test_failed_save_leaves_the_previous_model_untouched(tmp_path):
  target = tmp_path / 'm'
  save_model(target, _variables(0), 'mobilenetv3_small_050', 2, 64)
  broken = _variables(1)
  broken['params']['head']['bias'] = object()  # not an array: the save must refuse it
  with pytest.raises(TypeError, match=r"\['params'\]\['head'\]\['bias'\].*expected a numeric"):
    save_model(target, broken, 'mobilenetv3_small_050', 2, 64)
  _, loaded = load_model(target)
  np.testing.assert_array_equal(loaded['params']['head']['bias'],
                                _variables(0)['params']['head']['bias'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m']  # no temp dirs left behind


def test_replacing_a_model(tmp_path):
  save_model(tmp_path / 'm', _variables(0), 'mobilenetv3_small_050', 2, 64)
  save_model(tmp_path / 'm', _variables(1), 'mobilenetv3_small_050', 2, 64)
  _, loaded = load_model(tmp_path / 'm')
  np.testing.assert_array_equal(loaded['params']['head']['bias'],
                                _variables(1)['params']['head']['bias'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m']


def test_a_save_removes_what_an_earlier_failed_save_left(tmp_path):
  # A write still in flight when a save failed (disk full) can recreate its temp folder after
  # the clean-up; the next save of the same directory removes it, and only its own.
  (tmp_path / 'm.tmp-abc123' / 'variables').mkdir(parents=True)
  (tmp_path / 'other.tmp-x').mkdir()
  save_model(tmp_path / 'm', _variables(0), 'mobilenetv3_small_050', 2, 64)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m', 'other.tmp-x']


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a kdflax model directory'):
    read_model_info(tmp_path)
  (tmp_path / 'model.json').write_text('{"model": "mobilenetv3_small_050"}')
  with pytest.raises(ValueError, match='malformed model description'):
    read_model_info(tmp_path)
  (tmp_path / 'model.json').write_text(json.dumps(
      {'model': 'resnet50', 'num_classes': 2, 'image_size': 64}))
  with pytest.raises(ValueError, match="unknown model 'resnet50'"):
    read_model_info(tmp_path)
  with pytest.raises(ValueError, match='3 labels for 2 classes'):
    save_model(tmp_path / 'x', _variables(), 'mobilenetv3_small_050', 2, 64, ['a', 'b', 'c'])


def test_crash_after_the_variables_are_written_leaves_the_previous_model(tmp_path, monkeypatch):
  target = tmp_path / 'm'
  save_model(target, _variables(0), 'mobilenetv3_small_050', 2, 64)

  def disk_full(*args, **kwargs):
    raise OSError('No space left on device')

  monkeypatch.setattr(checkpoint.json, 'dump', disk_full)  # fails after Orbax has written
  with pytest.raises(OSError, match='No space left'):
    save_model(target, _variables(1), 'mobilenetv3_small_050', 2, 64)
  monkeypatch.undo()
  _, loaded = load_model(target)
  np.testing.assert_array_equal(loaded['params']['head']['bias'],
                                _variables(0)['params']['head']['bias'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m']
