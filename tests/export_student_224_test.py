"""The phone model itself: MobileNetV3-Large at 224 px -> fp32 `.tflite`, builtin ops only,
matching JAX to 1e-4 when run by ai_edge_litert in a child process."""

from helpers.export_models import init_calibrated, leaf_images

from kdflax.export import inventory, tflite
from kdflax.export.interpreter import TFLiteClassifier, read_model_metadata
from kdflax.models import create_model


def test_large_student_at_224_converts_and_matches_jax(tmp_path):
  module, size = create_model('mobilenetv3_large_100', num_classes=3)
  assert size == 224
  # BatchNorm statistics of 3 photos, so activations (and logits) are O(1), as trained.
  variables = init_calibrated(module, 224, leaf_images(224, 'train', per_class=1))
  photos = leaf_images(224, 'val', per_class=1)
  out = tmp_path / 'student.tflite'
  result = tflite.export_tflite(module, variables, 224, out, 'fp32', parity_images=photos,
                                labels=('angular_leaf_spot', 'bean_rust', 'healthy'))
  # The check ran the file in LiteRT (child process) against JAX on 3 real photos.
  assert result.parity.passed and result.parity.num_images == 3
  assert result.parity.max_abs_diff <= 1e-4  # absolute, on the output probabilities
  content = out.read_bytes()
  assert inventory.non_builtin_ops(content) == []
  assert {'CONV_2D', 'DEPTHWISE_CONV_2D', 'HARD_SWISH', 'FULLY_CONNECTED', 'SOFTMAX'} <= set(
      inventory.op_names(content))
  assert read_model_metadata(content)['input']['shape'] == [1, 224, 224, 3]
  clf = TFLiteClassifier(out)
  assert clf.interpreter.get_signature_list()['serving_default'] == {
      'inputs': ['image'], 'outputs': ['probabilities']}
