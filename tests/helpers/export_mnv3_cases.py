"""Export checks shared by the MobileNetV3 Large and Small test files (one per model, so each
file stays short): the student through the TFLite export at every precision.

Weights are random with BatchNorm statistics of real leaf photos (`stand_in`), at 64 px. A test
file defines a `model_name` fixture and star-imports this module.
"""

import jax
import numpy as np
import pytest

from helpers.export_models import init_calibrated, leaf_images
from kdflax.export import flatbuffer, isolated, lowering, tflite
from kdflax.export.interpreter import TFLiteClassifier
from kdflax.models import create_model
from kdflax.models.complexity import count_params

SIZE = 64
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')


@pytest.fixture(scope='module')
def photos():
  return {'calib': leaf_images(SIZE, 'train', per_class=6), 'val': leaf_images(SIZE, 'val', 5)}


@pytest.fixture(scope='module')
def student(model_name, photos):
  module, _ = create_model(model_name, num_classes=3)
  return model_name, module, init_calibrated(module, SIZE, photos['calib'])


def test_fp32_export_passes_parity(tmp_path, student, photos):
  name, module, variables = student
  fn = tflite.serving_function(module, variables)
  spec = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.uint8)
  out = tmp_path / f'{name}_fp32.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp32',
                                calibration_images=photos['calib'], parity_images=photos['val'],
                                labels=LABELS, model_name=name)
  assert result.parity.passed and result.parity.max_abs_diff < 1e-4, result.parity.summary()
  content = out.read_bytes()
  assert flatbuffer.non_builtin_ops(content) == []
  hard_swish = lowering.count_calls(fn, spec, ('hard_silu',))
  assert flatbuffer.op_names(content).count('HARD_SWISH') == hard_swish > 10
  clf = TFLiteClassifier(out)
  assert clf.delegate_partitions == 1 and clf.labels == LABELS


def test_fp16_export_adds_nothing_to_weight_rounding(tmp_path, student, photos):
  """fp16 error = what rounding the weights to float16 does to this model, no more.

  Random MobileNetV3 weights are unusually sensitive (measured: rounding them to fp16 in JAX
  moves Large's logits by ~1% of their range, about the 1e-2 gate), so the gate may or may
  not pass here; the export must not add error of its own.
  """
  name, module, variables = student
  out = tmp_path / f'{name}_fp16.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp16',
                                calibration_images=photos['calib'], parity_images=photos['val'],
                                labels=LABELS, allow_mismatch=True)
  assert flatbuffer.tensor_types(out.read_bytes()).get('FLOAT16', 0) > 50
  want = tflite.jax_logits(tflite.serving_function(module, variables), photos['val'])
  half = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), variables)
  rounding = np.abs(tflite.jax_logits(tflite.serving_function(module, half), photos['val'])
                    - want).max()
  got = TFLiteClassifier(out)(photos['val'])
  assert np.abs(got - want).max() == pytest.approx(result.parity.max_abs_diff, rel=1e-5)
  assert 0 < result.parity.max_abs_diff < 1.5 * rounding + 1e-4, (result.parity, rounding)
  assert result.parity.top1_agreement >= 0.9


def test_int8_export_is_fully_quantized_and_tracks_jax(tmp_path, student, photos):
  """Full-int8 export: one XNNPACK partition, int8 everywhere between the two ends.

  The parity gate (top-1 agreement >= 98%) is not asserted here: on random weights int8
  rounding decides the arg-max (measured 67% / 87% agreement for Large / Small here, 59-66%
  for Large at 224 px; see docs/export.md), so the logits are only required to follow JAX.
  """
  name, module, variables = student
  out = tmp_path / f'{name}_int8.tflite'
  seen = []
  result = tflite.export_tflite(module, variables, SIZE, out, 'int8',
                                calibration_images=photos['calib'], parity_images=photos['val'],
                                labels=LABELS, allow_mismatch=True, on_mismatch=seen.append)
  assert seen == ([] if result.parity.passed else [result.parity])
  content = out.read_bytes()
  ops = flatbuffer.op_names(content)
  assert 'HARD_SWISH' not in ops and flatbuffer.non_builtin_ops(content) == []
  assert ops[:2] == ['CAST', 'QUANTIZE'] and ops[-1] == 'DEQUANTIZE'
  assert ops.count('QUANTIZE') == 1 and ops.count('DEQUANTIZE') == 1
  types = flatbuffer.tensor_types(content)
  assert types['INT8'] > 5 * types.get('FLOAT32', 0)
  clf = TFLiteClassifier(out)
  assert clf.delegate_partitions == 1
  want = tflite.jax_logits(tflite.serving_function(module, variables), photos['val'])
  got = isolated.run_isolated(out, photos['val'])
  np.testing.assert_allclose(got, clf(photos['val']), atol=1e-6)  # child == in-process
  a, b = got - got.mean(0), want - want.mean(0)
  corr = float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))
  # Measured: 0.38 (Large), 0.43 (Small) here; ~0.9 for Large at 224 px.
  assert corr > 0.25, corr
  assert result.parity.top1_agreement == np.mean(got.argmax(-1) == want.argmax(-1))
  params = count_params(variables)
  assert 0.9 * params < len(content) < 1.3 * params  # ~1 byte per weight
