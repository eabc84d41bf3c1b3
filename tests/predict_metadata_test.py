"""`kdflax predict` on files with standard TFLite metadata, older kdflax files, and a third
party's image classifier whose labels exist only in its standard metadata."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers.export_models import BEANS, TinyCNN, init_calibrated, leaf_images

from kdflax.commands import predict
from kdflax.export import flatbuffer, flatbuffer_edits, tflite
from kdflax.export.images import find_images, load_images
from kdflax.export.interpreter import METADATA_NAME, TFLiteClassifier, labels_path
from kdflax.export.model_metadata import read_standard_metadata

SIZE = 32
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')
VAL = BEANS / 'val' / 'bean_rust'


@pytest.fixture(scope='module')
def cnn():
  module = TinyCNN(num_classes=3)
  return module, init_calibrated(module, SIZE, leaf_images(SIZE, 'train', per_class=4))


def _predict(capsys, model, *paths) -> list[dict]:
  capsys.readouterr()
  code = predict.main(['predict', '--model', str(model), *map(str, paths), '--no-progress',
                       '--top_k', '3'])
  out = capsys.readouterr().out
  assert code == 0, out
  return [json.loads(line) for line in out.splitlines()]


def _scores(lines: list[dict], labels) -> np.ndarray:
  return np.asarray([[{e['label']: e['score'] for e in x['top_k']}[name] for name in labels]
                     for x in lines])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_new_file_labels_come_from_inside_the_file(tmp_path, cnn, capsys):
  module, variables = cnn
  out = tmp_path / 'm.tflite'
  tflite.export_tflite(module, variables, SIZE, out, 'fp32', labels=LABELS, model_name='tiny')
  os.remove(labels_path(out))  # no sidecar: labels from the metadata
  lines = _predict(capsys, out, VAL)
  files = find_images([VAL])
  assert [x['file'] for x in lines] == files
  want = _softmax(np.asarray(module.apply(variables, load_images(files, SIZE) / 255.0)))
  np.testing.assert_allclose(_scores(lines, LABELS), want, atol=2e-5)
  assert [x['label'] for x in lines] == [LABELS[i] for i in want.argmax(-1)]


def test_new_file_with_only_standard_metadata(tmp_path, cnn, capsys):
  """Without kdflax's own entry (as a tool that keeps only standard metadata would leave it),
  the labels come from the packed TENSOR_AXIS_LABELS file and probabilities stay as they are."""
  module, variables = cnn
  out = tmp_path / 'm.tflite'
  tflite.export_tflite(module, variables, SIZE, out, 'int8', labels=LABELS,
                       calibration_images=leaf_images(SIZE, 'train', per_class=4))
  os.remove(labels_path(out))
  content = out.read_bytes()
  # Blank kdflax's entry in place (same length, not JSON): the packed zip stays intact.
  raw = flatbuffer.read_metadata(content, METADATA_NAME)
  start = content.index(raw)
  stripped = content[:start] + b' ' * len(raw) + content[start + len(raw):]
  bare = tmp_path / 'bare.tflite'
  bare.write_bytes(stripped)
  clf = TFLiteClassifier(bare)
  assert clf.metadata == {} and clf.labels == LABELS and clf.output_kind == 'probabilities'
  lines = _predict(capsys, bare, VAL)
  files = find_images([VAL])
  want = clf(load_images(files, SIZE))
  np.testing.assert_allclose(_scores(lines, LABELS), want / want.sum(-1, keepdims=True),
                             atol=2e-6)


def test_older_kdflax_files(tmp_path, cnn, capsys):
  """Files from before the standard metadata: logits out, labels in kdflax's entry or only in
  the sidecar, or nowhere (class indices). Scores are the softmax of the logits."""
  module, variables = cnn
  fn = tflite.serving_function(module, variables)  # logits
  model = flatbuffer_edits.dequantize_uint8_inputs(tflite.convert(fn, SIZE, 'fp32'))
  old_meta = {'format': 'kdflax-tflite/1', 'model': 'tiny', 'precision': 'fp32',
              'input': {'name': 'image', 'shape': [1, SIZE, SIZE, 3], 'dtype': 'uint8'},
              'output': {'name': 'logits', 'shape': [1, 3], 'dtype': 'float32'},
              'num_classes': 3, 'labels': list(LABELS)}
  with_meta = tmp_path / 'old.tflite'
  with_meta.write_bytes(flatbuffer_edits.add_metadata(model, METADATA_NAME,
                                                json.dumps(old_meta).encode()))
  sidecar_only = tmp_path / 'older.tflite'
  sidecar_only.write_bytes(model)
  pathlib.Path(labels_path(sidecar_only)).write_text(''.join(f'{x}\n' for x in LABELS))
  nothing = tmp_path / 'nothing.tflite'
  nothing.write_bytes(model)
  files = find_images([VAL])
  want = _softmax(np.asarray(module.apply(variables, load_images(files, SIZE) / 255.0)))
  for path in (with_meta, sidecar_only):
    assert read_standard_metadata(path.read_bytes()) is None
    lines = _predict(capsys, path, VAL)
    np.testing.assert_allclose(_scores(lines, LABELS), want, atol=2e-5, err_msg=path.name)
  lines = _predict(capsys, nothing, VAL)
  np.testing.assert_allclose(_scores(lines, ('0', '1', '2')), want, atol=2e-5)


_WRITE_THIRD_PARTY = r'''
import sys
from kdflax.export.model_metadata import _import_writer
_import_writer()  # mediapipe's writer modules (providing the helper 1.2.x wheels lack)
from mediapipe.tasks.python.metadata.metadata_writers import image_classifier, metadata_writer
src, dst = sys.argv[1], sys.argv[2]
labels = metadata_writer.Labels().add(sys.argv[3].split(','))
writer = image_classifier.MetadataWriter.create(bytearray(open(src, 'rb').read()),
                                                [127.5], [127.5], labels)
open(dst, 'wb').write(writer.populate()[0])
'''


def test_third_party_classifier_with_standard_metadata(tmp_path, capsys):
  """A TF model prepared for MediaPipe by someone else: float input normalised by the
  metadata's (x - 127.5) / 127.5, softmax output, labels only in its metadata."""
  names = ('red', 'green', 'blue', 'dark')
  weights = tf.constant(np.random.default_rng(0).normal(size=(3, 4)) * 4, tf.float32)

  class Classifier(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec((1, 24, 24, 3), tf.float32)])
    def __call__(self, x):
      return tf.nn.softmax(tf.reduce_mean(x, axis=(1, 2)) @ weights)

  net = Classifier()
  converter = tf.lite.TFLiteConverter.from_concrete_functions(
      [net.__call__.get_concrete_function()], net)
  plain = tmp_path / 'plain.tflite'
  plain.write_bytes(converter.convert())
  model = tmp_path / 'third_party.tflite'
  proc = subprocess.run([sys.executable, '-c', _WRITE_THIRD_PARTY, str(plain), str(model),
                         ','.join(names)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  standard = read_standard_metadata(model.read_bytes())
  assert standard.labels == names and standard.input_mean == (127.5,)
  assert standard.input_std == (127.5,)

  lines = _predict(capsys, model, VAL)
  files = find_images([VAL])
  x = (load_images(files, 24).astype(np.float32) - 127.5) / 127.5
  want = np.concatenate([net(x[i:i + 1]).numpy() for i in range(len(x))])
  assert all({e['label'] for e in x['top_k']} <= set(names) for x in lines)
  top = want.argmax(-1)
  assert [x['label'] for x in lines] == [names[i] for i in top]
  for line, row in zip(lines, want, strict=True):
    for entry in line['top_k']:
      assert entry['score'] == pytest.approx(row[names.index(entry['label'])], abs=2e-6)
