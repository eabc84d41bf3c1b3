"""Export checks shared by the MobileNetV3 Large and Small test files (one per model, so each
file stays short): the student through the TFLite export at every precision.

The student is trained first (60 steps of the kdflax train step over-fit 48 real leaf photos
at 48 px), because parity gates are about a trained model: random weights have no class
margins, and rounding alone decides their arg-max. A test file defines a `model_name`
fixture and star-imports this module.
"""

import jax
import numpy as np
import pytest

from helpers.export_models import leaf_images, train_briefly
from kdflax.export import inventory, isolated, lowering, tflite
from kdflax.export.interpreter import TFLiteClassifier
from kdflax.models import create_model
from kdflax.models.complexity import count_params

SIZE = 48
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')


PER_CLASS = 16


@pytest.fixture(scope='module')
def photos():
  return {'calib': leaf_images(SIZE, 'train', per_class=PER_CLASS),
          'val': leaf_images(SIZE, 'val', 5)}


@pytest.fixture(scope='module')
def student(model_name, photos):
  module, _ = create_model(model_name, num_classes=3, drop_rate=0.0)
  labels = np.repeat(np.arange(3), PER_CLASS)
  return model_name, module, train_briefly(module, photos['calib'], labels)


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
  assert inventory.non_builtin_ops(content) == []
  hard_swish = lowering.count_calls(fn, spec, ('hard_silu',))
  assert inventory.op_names(content).count('HARD_SWISH') == hard_swish > 10
  clf = TFLiteClassifier(out)
  assert clf.delegate_partitions == 1 and clf.labels == LABELS


def test_fp16_export_passes_parity(tmp_path, student, photos):
  """fp16 weights: probabilities within the 2e-2 gate, the same top-1, and not the fp32 file."""
  name, module, variables = student
  out = tmp_path / f'{name}_fp16.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp16',
                                calibration_images=photos['calib'], parity_images=photos['val'],
                                labels=LABELS)
  assert result.parity.passed and result.parity.top1_agreement == 1.0, result.parity.summary()
  assert inventory.tensor_types(out.read_bytes()).get('FLOAT16', 0) > 50
  want = tflite.jax_logits(tflite.serving_function(module, variables, output='probabilities'),
                           photos['val'])
  got = TFLiteClassifier(out)(photos['val'])
  assert np.abs(got - want).max() == pytest.approx(result.parity.max_abs_diff, rel=1e-5)
  assert 0 < result.parity.max_abs_diff <= 2e-2  # rounded, unlike the fp32 file (<= 1e-4)


def test_int8_export_is_fully_quantized_and_passes_parity(tmp_path, student, photos):
  """Full-int8: one XNNPACK partition, int8 between the two ends, and top-1 agreement with
  JAX >= 98% on the calibration photos (the gate of `export_tflite`, no allow_mismatch)."""
  name, module, variables = student
  out = tmp_path / f'{name}_int8.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, 'int8',
                                calibration_images=photos['calib'],
                                parity_images=photos['calib'], labels=LABELS)
  assert result.parity.passed and result.parity.top1_agreement >= 0.98, result.parity.summary()
  content = out.read_bytes()
  ops = inventory.op_names(content)
  assert 'HARD_SWISH' not in ops and inventory.non_builtin_ops(content) == []
  # uint8 pixels -> float (exact, identity quantization) -> int8; int8 logits -> float ->
  # float SOFTMAX (probabilities).
  assert ops[:2] == ['DEQUANTIZE', 'QUANTIZE'] and ops[-2:] == ['DEQUANTIZE', 'SOFTMAX']
  assert ops.count('QUANTIZE') == 1 and ops.count('DEQUANTIZE') == 2 and 'CAST' not in ops
  types = inventory.tensor_types(content)
  assert types['INT8'] > 5 * types.get('FLOAT32', 0)
  clf = TFLiteClassifier(out)
  assert clf.delegate_partitions == 1
  want = tflite.jax_logits(tflite.serving_function(module, variables, output='probabilities'),
                           photos['calib'])
  got = isolated.run_isolated(out, photos['calib'])
  np.testing.assert_allclose(got, clf(photos['calib']), atol=1e-6)  # child == in-process
  assert result.parity.top1_agreement == np.mean(got.argmax(-1) == want.argmax(-1))
  params = count_params(variables)
  assert 0.9 * params < len(content) < 1.3 * params  # ~1 byte per weight
