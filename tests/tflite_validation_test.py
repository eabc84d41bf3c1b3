"""A truncated, empty or foreign `.tflite` is a one-line error naming the file (exit 2 from
`kdflax predict`), never a `struct.error` traceback."""

import json
import os
import struct

import pytest
from helpers.export_models import leaf_files

from kdflax.commands import predict
from kdflax.export import flatbuffer
from kdflax.export.interpreter import METADATA_NAME, TFLiteClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}
SIZE = 32


@pytest.fixture
def model(tiny_tflite):
  return tiny_tflite


@pytest.fixture
def photo(leaf_photo):
  return leaf_photo


def _validation_error(content, path='m.tflite'):
  with pytest.raises(flatbuffer.ModelFileError) as info:
    flatbuffer.validate_tflite(content, path)
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'{path} '), message
  return message


def test_a_valid_model_passes(model):
  path, content = model
  flatbuffer.validate_tflite(content, str(path))
  assert flatbuffer.read_tflite(path) == content
  meta = json.loads(flatbuffer.read_metadata(content, METADATA_NAME))
  assert meta['labels'] == ['a', 'b', 'c']
  assert flatbuffer.read_metadata(content, 'no-such-entry') is None


@pytest.mark.parametrize('fraction', [0.001, 0.01, 0.25, 0.5, 0.85, 0.999])
def test_truncated_model_is_named_truncated(model, fraction):
  content = model[1]
  cut = max(8, int(len(content) * fraction))
  assert 'is truncated: ' in _validation_error(content[:cut])


def test_no_cut_raises_anything_but_the_one_line_error(model):
  content = model[1]
  # Cut exactly where the labels zip of the standard metadata starts, the file is a complete
  # model that lost its packed files (as when a tool rewrites the flatbuffer): valid.
  flatbuffer_end = content.index(b'PK\x03\x04')
  flatbuffer.validate_tflite(content[:flatbuffer_end])
  for cut in range(0, len(content), 7):
    if cut == flatbuffer_end:
      continue
    with pytest.raises(flatbuffer.ModelFileError):
      flatbuffer.validate_tflite(content[:cut])
    with pytest.raises(flatbuffer.ModelFileError):  # not struct.error / IndexError
      flatbuffer.read_metadata(content[:cut], METADATA_NAME)


def test_empty_short_and_foreign_files(model):
  assert 'not a TFLite model (the file is empty)' in _validation_error(b'')
  assert 'not a TFLite model (5 bytes' in _validation_error(b'TFL3!')
  jpeg = leaf_files('val', per_class=1)[0].read_bytes()
  message = _validation_error(jpeg)
  assert message.endswith('is not a TFLite model (no TFL3 identifier; it looks like a JPEG '
                          'image)'), message
  assert 'no TFL3 identifier' in _validation_error(b'\x00' * 64)


def test_offsets_past_the_end_are_caught(model):
  content = bytearray(model[1])
  content[0:4] = struct.pack('<I', len(content) + 100)  # root table offset past the end
  assert 'is truncated: the Model table' in _validation_error(bytes(content))
  content = bytearray(model[1])
  content[0:4] = struct.pack('<I', 0xFFFFFFF0)
  assert 'is truncated' in _validation_error(bytes(content))


def test_interpreter_wrapper_gets_the_one_line_error(model, tmp_path):
  bad = tmp_path / 'cut.tflite'
  bad.write_bytes(model[1][:len(model[1]) // 2])
  with pytest.raises(ValueError, match='truncated') as info:
    TFLiteClassifier(bad)
  assert not isinstance(info.value, struct.error)


@pytest.mark.parametrize('kind', ['truncated', 'empty', 'jpeg', 'garbage'])
def test_predict_exits_2_with_one_line(model, photo, tmp_path, capsys, kind):
  content = model[1]
  data = {'truncated': content[:int(len(content) * 0.85)], 'empty': b'',
          'jpeg': photo.read_bytes(), 'garbage': os.urandom(4096)}[kind]
  bad = tmp_path / f'{kind}.tflite'
  bad.write_bytes(data)
  code = predict.main(['predict', '--model', str(bad), str(photo), '--no-progress'])
  out, err = capsys.readouterr()
  assert code == 2 and out == ''
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'kdflax predict: error: {bad} '), err


def test_a_model_the_interpreter_refuses_is_one_line_exit_2(model, photo, tmp_path, capsys):
  from ai_edge_litert.tools import flatbuffer_utils
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model[1]))
  obj.subgraphs[0].operators[0].opcodeIndex = 999  # structurally sound, not runnable
  bad = tmp_path / 'badop.tflite'
  bad.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(obj)))
  flatbuffer.validate_tflite(bad.read_bytes(), str(bad))
  assert predict.main(['predict', '--model', str(bad), str(photo), '--no-progress']) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith(f'kdflax predict: error: {bad}: the LiteRT interpreter cannot load')
