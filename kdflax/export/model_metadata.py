"""Standard TFLite Model Metadata: written with MediaPipe's writer, read without MediaPipe.

Every exported file carries the standard metadata (`TFLITE_METADATA` entry, flatbuffer
`metadata_schema.fbs` version 1.x) that MediaPipe Tasks `ImageClassifier`, Android Studio's
ML binding and other app-side runners read: model name / description / version, the input
described as an RGB image (uint8 0..255, or float 0..1 with one NormalizationOptions
mean 0 / std 255), the output as a classification tensor whose category names are the
TENSOR_AXIS_LABELS file `labels.txt` packed inside the `.tflite` (zip appended to the model).

    model = write_standard_metadata(model, name='student', description='...', version='1',
                                    labels=('a', 'b'), input_type='uint8',
                                    output='probabilities')
    meta = read_standard_metadata(model)   # StandardMetadata(labels=('a', 'b'), ...) or None

Writing uses the maintained writer shipped in the `mediapipe` wheel
(`mediapipe.tasks.python.metadata.metadata_writers.metadata_writer`) in a child process
(`python -m kdflax.export.model_metadata`): MediaPipe loads its own native runtime, which is
kept out of the exporting process (TensorFlow, JAX). mediapipe 1.2.x wheels ship the
writer's Python but not the `_pywrap_metadata_version` extension it imports to compute
`min_parser_version`; the child then provides that one function (`_min_parser_version`,
the schema's version rules for the fields written here). Reading parses the flatbuffer and
the zip directly, so `kdflax predict` works on any file with standard metadata (ours, or a
third party's) without importing MediaPipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Sequence

from kdflax.export.child_env import child_env
from kdflax.export.flatbuffer import STANDARD_METADATA, ModelFileError, _Reader, read_metadata

STANDARD_NAME = STANDARD_METADATA
OUTPUTS = ('probabilities', 'logits')
_LABELS_FILE = 'labels.txt'

# Field slots (schema order) of metadata_schema.fbs tables.
_MODEL_NAME, _MODEL_DESCRIPTION, _MODEL_VERSION, _MODEL_SUBGRAPHS = 0, 1, 2, 3
_SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 2, 3
_TENSOR_NAME, _TENSOR_DESCRIPTION, _TENSOR_PROCESS_UNITS, _TENSOR_FILES = 0, 1, 4, 6
_FILE_NAME, _FILE_TYPE, _FILE_LOCALE = 0, 2, 3
_UNIT_OPTIONS_TYPE, _UNIT_OPTIONS = 0, 1
_NORM_MEAN, _NORM_STD = 0, 1
_TENSOR_AXIS_LABELS = 2
_NORMALIZATION_OPTIONS = 1


@dataclasses.dataclass(frozen=True)
class StandardMetadata:
  """What the standard metadata of a classifier says (the parts kdflax uses).

  Attributes:
    name, description, version: the model's general info ('' when absent).
    labels: category names from the output's TENSOR_AXIS_LABELS file (the one without a
      locale, else the first), `()` when there is none.
    input_mean, input_std: the input's NormalizationOptions (`()` when none: the input takes
      the values as they are, e.g. uint8 pixels).
    output_name, output_description: the output tensor's metadata name and description.
  """

  name: str = ''
  description: str = ''
  version: str = ''
  labels: tuple[str, ...] = ()
  input_mean: tuple[float, ...] = ()
  input_std: tuple[float, ...] = ()
  output_name: str = ''
  output_description: str = ''


def _string(reader: _Reader, table, slot: int, what: str) -> str:
  start, length = reader.vector(table, slot, 1, what)
  return bytes(reader.data[start:start + length]).decode('utf-8', 'replace') if length else ''


def _floats(reader: _Reader, table, slot: int, what: str) -> tuple[float, ...]:
  import struct
  start, length = reader.vector(table, slot, 4, what)
  return tuple(struct.unpack_from(f'<{length}f', reader.data, start)) if length else ()


def _normalization(reader: _Reader, tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
  for i, unit in enumerate(reader.tables(tensor, _TENSOR_PROCESS_UNITS, 'process_units')):
    kind = reader.field_scalar(unit, _UNIT_OPTIONS_TYPE, '<B', f'process_units[{i}] type')
    pos = reader.field(unit, _UNIT_OPTIONS)
    if kind != _NORMALIZATION_OPTIONS or pos is None:
      continue
    opts = reader.table(reader.follow(pos, 'NormalizationOptions'), 'NormalizationOptions')
    return (_floats(reader, opts, _NORM_MEAN, 'the normalization mean'),
            _floats(reader, opts, _NORM_STD, 'the normalization std'))
  return (), ()


def _label_file(reader: _Reader, tensor) -> str | None:
  """Name of the tensor's TENSOR_AXIS_LABELS file: the one without a locale, else the first."""
  found = []
  for i, f in enumerate(reader.tables(tensor, _TENSOR_FILES, 'associated_files')):
    if reader.field_scalar(f, _FILE_TYPE, '<b', f'associated_files[{i}].type') \
        == _TENSOR_AXIS_LABELS:
      found.append((bool(_string(reader, f, _FILE_LOCALE, 'a locale')),
                    _string(reader, f, _FILE_NAME, 'a file name')))
  return min(found)[1] if found else None


def read_standard_metadata(content: bytes, path: str = 'the model') -> StandardMetadata | None:
  """The standard metadata of a `.tflite` (bytes), or None when it has none.

  Raises:
    ModelFileError: the model, its metadata buffer or its packed files are truncated or
      corrupt (one line naming `path`).
  """
  raw = read_metadata(content, STANDARD_NAME, path)
  if not raw:
    return None
  try:
    reader = _Reader(raw, f'{path} (standard metadata)')
    root = reader.table(reader.follow(0, 'the ModelMetadata offset'), 'ModelMetadata')
    graphs = reader.tables(root, _MODEL_SUBGRAPHS, 'subgraph_metadata')
    mean = std = ()
    label_file = None
    output_name = output_description = ''
    if graphs:
      inputs = reader.tables(graphs[0], _SUBGRAPH_INPUTS, 'input_tensor_metadata')
      outputs = reader.tables(graphs[0], _SUBGRAPH_OUTPUTS, 'output_tensor_metadata')
      if inputs:
        mean, std = _normalization(reader, inputs[0])
      if outputs:
        label_file = _label_file(reader, outputs[0])
        output_name = _string(reader, outputs[0], _TENSOR_NAME, 'the output name')
        output_description = _string(reader, outputs[0], _TENSOR_DESCRIPTION,
                                     'the output description')
    labels: tuple[str, ...] = ()
    if label_file:
      labels = _packed_labels(content, label_file, path)
    return StandardMetadata(
        name=_string(reader, root, _MODEL_NAME, 'the model name'),
        description=_string(reader, root, _MODEL_DESCRIPTION, 'the description'),
        version=_string(reader, root, _MODEL_VERSION, 'the version'),
        labels=labels, input_mean=mean, input_std=std, output_name=output_name,
        output_description=output_description)
  except (IndexError, OverflowError, UnicodeDecodeError) as e:
    raise ModelFileError(f'{path}: corrupt standard metadata ({e})') from None


def _packed_labels(content: bytes, name: str, path: str) -> tuple[str, ...]:
  """One label per non-empty line of file `name` in the zip packed into the model; `()` when
  the file lost its packed files (a tool rewrote the flatbuffer: labels then come from
  elsewhere). A truncated zip has already failed `validate_tflite`."""
  try:
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
      text = archive.read(name).decode('utf-8')
  except (zipfile.BadZipFile, KeyError):
    return ()
  except UnicodeDecodeError as e:
    raise ModelFileError(f'{path}: the packed label file {name!r} is not UTF-8 ({e})') from None
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def write_standard_metadata(model: bytes, *, name: str, description: str, version: str,
                            labels: Sequence[str], input_type: str = 'uint8',
                            output: str = 'probabilities', author: str = 'kdflax',
                            timeout: float = 300) -> bytes:
  """A copy of `model` with standard TFLite Model Metadata (and `labels.txt` packed inside).

  Args:
    model: `.tflite` bytes with one `(1, S, S, 3)` image input and one `(1, K)` output.
    name, description, version, author: general info.
    labels: K category names (packed as the output's TENSOR_AXIS_LABELS file); `()` for none.
    input_type: 'uint8' (pixels 0..255, no normalisation) or 'float32' (0..1: one
      NormalizationOptions mean 0, std 255).
    output: 'probabilities' or 'logits' (the output tensor's description).

  Raises:
    RuntimeError: the writer failed (one line).
  """
  if output not in OUTPUTS:
    raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
  spec = {'name': name, 'description': description, 'version': version, 'author': author,
          'labels': list(labels), 'input_type': input_type, 'output': output}
  with tempfile.TemporaryDirectory(prefix='kdflax-metadata-') as tmp:
    src, dst = os.path.join(tmp, 'in.tflite'), os.path.join(tmp, 'out.tflite')
    with open(src, 'wb') as f:
      f.write(model)
    cmd = [sys.executable, '-m', 'kdflax.export.model_metadata', '--model', src, '--out', dst,
           '--spec', json.dumps(spec)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env=child_env())
    except subprocess.TimeoutExpired:
      raise RuntimeError(f'the metadata writer did not finish within {timeout:.0f} s') from None
    if proc.returncode != 0 or not os.path.exists(dst):
      lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
      raise RuntimeError('writing the standard TFLite metadata (mediapipe) failed: '
                         + (lines[-1] if lines else f'exit status {proc.returncode}'))
    with open(dst, 'rb') as f:
      return f.read()


# ------------------------------------------------------------------------------ child side


def _min_parser_version(buf: bytes) -> str:
  """`min_parser_version` of what `_populate` writes: no field newer than schema 1.0.0.

  (Input/output process units on the subgraph would need 1.1.0, tensor groups 1.2.0,
  associated-file versions 1.4.1, custom metadata 1.5.0; none is written.)
  """
  del buf
  return '1.0.0'


def _import_writer():
  """MediaPipe's metadata writer modules, with the missing native helper provided if needed."""
  sys.modules.setdefault('tensorflow', None)  # its optional tf.io.gfile use: plain files here
  try:
    from mediapipe.tasks.cc.metadata.python import _pywrap_metadata_version  # noqa: F401
  except ImportError:
    names = ('mediapipe.tasks.cc', 'mediapipe.tasks.cc.metadata',
             'mediapipe.tasks.cc.metadata.python')
    for n in names:
      sys.modules.setdefault(n, types.ModuleType(n))
    shim = types.ModuleType(names[-1] + '._pywrap_metadata_version')
    shim.GetMinimumMetadataParserVersion = _min_parser_version
    sys.modules[shim.__name__] = shim
    sys.modules[names[-1]]._pywrap_metadata_version = shim
  from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, metadata_writer
  return metadata_info, metadata_writer


def _populate(model: bytes, spec: dict) -> bytes:
  metadata_info, metadata_writer = _import_writer()
  writer = metadata_writer.MetadataWriter.create(bytearray(model))
  # add_general_info takes no version / author; GeneralMd does.
  writer._general_md = metadata_info.GeneralMd(
      name=spec['name'], description=spec['description'], version=spec['version'],
      author=spec['author'])
  if spec['input_type'] == 'uint8':
    mean, std = [], []   # raw pixels; the model normalises inside its graph
    image_text = 'RGB image, uint8 0..255 (the photo\'s evaluation view; see docs/export.md)'
  else:
    mean, std = [0.0], [255.0]
    image_text = 'RGB image, float32 0..1 (pixels / 255; the photo\'s evaluation view)'
  writer.add_image_input(mean, std, name='image', description=image_text)
  labels = metadata_writer.Labels().add(list(spec['labels']), exported_filename=_LABELS_FILE) \
      if spec['labels'] else None
  if spec['output'] == 'probabilities':
    out_text = 'Class probabilities (softmax in the graph, sum 1), one per label.'
  else:
    out_text = 'Class logits (no softmax: apply one for probabilities), one per label.'
  writer.add_classification_output(labels, name=spec['output'], description=out_text)
  content, _ = writer.populate()
  writer._temp_folder.cleanup()
  return bytes(content)


def _main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description='write standard TFLite metadata (child process)')
  p.add_argument('--model', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--spec', required=True, help='JSON, see write_standard_metadata')
  args = p.parse_args(argv)
  with open(args.model, 'rb') as f:
    model = f.read()
  content = _populate(model, json.loads(args.spec))
  with open(args.out, 'wb') as f:
    f.write(content)
  return 0


if __name__ == '__main__':
  sys.exit(_main(sys.argv[1:]))
