"""Percentile activation ranges for full-int8 export: the arithmetic and the converted files."""

import numpy as np
import pytest
from helpers.export_models import TinyCNN, init_calibrated, leaf_images

from kdflax.export import int8_ranges, inventory, tflite
from kdflax.export.interpreter import TFLiteClassifier

SIZE = 32


def test_percentile_ranges_match_numpy_and_always_hold_zero():
  rng = np.random.default_rng(0)
  heavy = rng.standard_t(2, 20000).astype(np.float32) + 3.0   # mostly positive, long tails
  positive = rng.uniform(0.5, 6.0, 5000).astype(np.float32)  # e.g. a relu6 gate
  got = int8_ranges.percentile_ranges({4: heavy, 9: positive}, 99.9)
  low, high = np.percentile(heavy.astype(np.float64), [0.1, 99.9])
  assert got[4] == pytest.approx((min(low, 0.0), high))
  assert got[9][0] == 0.0 and got[9][1] == pytest.approx(np.percentile(positive, 99.9))
  # The tails are cut: the range is far narrower than min/max for heavy-tailed values.
  assert got[4][1] - got[4][0] < 0.5 * (heavy.max() - min(heavy.min(), 0))
  # NaN / inf (e.g. from a float polynomial the calibrator ran) are ignored.
  dirty = np.concatenate([heavy, [np.nan, np.inf, -np.inf]]).astype(np.float32)
  assert int8_ranges.percentile_ranges({4: dirty, 5: np.full(3, np.nan)}, 99.9) == {4: got[4]}
  exact = int8_ranges.percentile_ranges({4: heavy}, 100.0)[4]
  assert exact == pytest.approx((min(float(heavy.min()), 0.0), float(heavy.max())))


@pytest.mark.parametrize('bad', [50.0, 0.0, 100.5])
def test_percentile_out_of_range_is_a_clear_error(bad):
  with pytest.raises(ValueError, match=r'percentile must be in \(50, 100\]'):
    int8_ranges.percentile_ranges({0: np.zeros(3, np.float32)}, bad)


@pytest.fixture(scope='module')
def tiny():
  module = TinyCNN(num_classes=3)
  variables = init_calibrated(module, SIZE, leaf_images(SIZE, 'train', per_class=4))
  return module, variables, leaf_images(SIZE, 'val', per_class=8)


def _activation_scales(path):
  """`{tensor name: scale}` of the int8 activation tensors of a `.tflite` (weights excluded)."""
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(str(path))
  out = {}
  for d in interpreter.get_tensor_details():
    scales = d['quantization_parameters']['scales']
    if d['dtype'] == np.int8 and len(scales) == 1 and 'serving' not in d['name']:
      out[d['name']] = float(scales[0])
  return out


def test_percentile_export_narrows_ranges_and_keeps_the_graph(tmp_path, tiny):
  module, variables, photos = tiny
  files = {}
  for p in (100.0, 99.0):
    files[p] = tmp_path / f'tiny_p{p:g}.tflite'
    # A random-weight model has near-zero margins: parity is not this test's subject.
    tflite.export_tflite(module, variables, SIZE, files[p], 'int8', calibration_images=photos,
                         activation_percentile=p, allow_mismatch=True)
  full, cut = _activation_scales(files[100.0]), _activation_scales(files[99.0])
  assert set(full) == set(cut) and len(full) > 10
  # Never wider than min/max; most activation ranges are narrower.
  assert all(cut[name] <= full[name] * (1 + 1e-6) for name in full)
  assert sum(cut[name] < 0.98 * full[name] for name in full) >= len(full) // 2
  assert inventory.op_names(files[100.0].read_bytes()) == inventory.op_names(
      files[99.0].read_bytes())
  scores = TFLiteClassifier(files[99.0])(photos)
  assert np.allclose(scores.sum(-1), 1.0, atol=1e-5)


def test_percentile_100_is_the_converters_min_max_model(tmp_path, tiny):
  """Calibrate-then-quantize with untouched ranges reproduces `converter.convert()`."""
  module, variables, photos = tiny
  ours = tmp_path / 'ours.tflite'
  tflite.export_tflite(module, variables, SIZE, ours, 'int8', calibration_images=photos,
                       activation_percentile=100.0)
  plain = tmp_path / 'plain.tflite'
  tflite.export_tflite(module, variables, SIZE, plain, 'int8', calibration_images=photos,
                       activation_percentile=None)
  assert _activation_scales(ours) == _activation_scales(plain)
  np.testing.assert_array_equal(TFLiteClassifier(ours)(photos), TFLiteClassifier(plain)(photos))
