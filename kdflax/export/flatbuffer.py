"""Read and annotate `.tflite` flatbuffers without running them.

Everything here parses the file with the TFLite schema only, so it is safe on graphs that would
abort the LiteRT interpreter (e.g. int8 erf-GELU): the op list of a freshly converted model can
be checked in the parent process, and only execution goes to a subprocess.

    ops = op_names(model_bytes)                # ['DEQUANTIZE', 'QUANTIZE', 'CONV_2D', ...]
    model_bytes = add_metadata(model_bytes, 'kdflax', json_bytes)
    read_metadata(model_bytes, 'kdflax')       # -> json_bytes
    model_bytes = dequantize_uint8_inputs(model_bytes)   # CAST -> DEQUANTIZE at the input
    model_bytes = append_softmax(model_bytes)            # float SOFTMAX on the float output

Files from elsewhere are checked before use: `read_tflite(path)` (or `validate_tflite(bytes,
path)`) raises `ModelFileError`, a `ValueError` with a one-line message naming the file, for an
empty or foreign file (no `TFL3` identifier) and for a truncated one (an offset of the model's
tables, vectors or buffers points past the end of the file, or, in a file with standard
metadata, the zip of packed files after the flatbuffer is incomplete). A file cut exactly at
the flatbuffer's end is a complete model that lost its packed files, as when a tool rewrites
the flatbuffer: it passes, and its labels come from elsewhere.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zipfile
from collections import Counter

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils


@functools.cache
def _builtin_names() -> dict[int, str]:
  return {v: k for k, v in vars(schema.BuiltinOperator).items()
          if not k.startswith('_') and isinstance(v, int)}


class ModelFileError(ValueError):
  """A `.tflite` that cannot be used: unreadable, empty, foreign or truncated (one line)."""


# Leading bytes of files that get renamed or mistaken for a model, for a clearer message.
_FOREIGN = ((b'\xff\xd8\xff', 'a JPEG image'), (b'\x89PNG', 'a PNG image'),
            (b'PK\x03\x04', 'a zip archive'), (b'\x89HDF', 'an HDF5 file'),
            (b'{', 'a JSON or text file'))

# Field slots (schema order) of the TFLite tables read here.
_MODEL_VECTORS_OF_TABLES = ((1, 'operator_codes'), (2, 'subgraphs'), (4, 'buffers'),
                            (6, 'metadata'), (7, 'signature_defs'))
_MODEL_DESCRIPTION, _MODEL_BUFFERS, _MODEL_METADATA_BUFFER, _MODEL_METADATA = 3, 4, 5, 6
_SUBGRAPH_TABLES = ((0, 'tensors'), (3, 'operators'))
_SUBGRAPH_INDICES = ((1, 'inputs'), (2, 'outputs'))
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_METADATA_NAME, _METADATA_BUFFER = 0, 1


class _Reader:
  """Bounds-checked little-endian reads of a flatbuffer; every failure names the file."""

  def __init__(self, data: bytes | bytearray, path: str):
    self.data, self.path, self.size = data, path, len(data)
    self.end = 0  # the furthest byte any check reached

  def need(self, pos: int, length: int, what: str) -> None:
    """Raises ModelFileError unless bytes `[pos, pos + length)` lie inside the file."""
    if pos < 0:
      raise ModelFileError(f'{self.path} is corrupt: {what} points before the start of the file')
    if pos + length > self.size:
      raise ModelFileError(f'{self.path} is truncated: {what} needs bytes {pos}..{pos + length} '
                           f'but the file has {self.size}')
    self.end = max(self.end, pos + length)

  def scalar(self, fmt: str, pos: int, what: str) -> int:
    self.need(pos, struct.calcsize(fmt), what)
    return struct.unpack_from(fmt, self.data, pos)[0]

  def follow(self, pos: int, what: str) -> int:
    """The absolute position a `uoffset_t` at `pos` points to."""
    return pos + self.scalar('<I', pos, what)

  def table(self, pos: int, what: str) -> tuple[int, int, int]:
    """`(table, vtable, vtable_size)` of the table at `pos`, its vtable checked."""
    vtable = pos - self.scalar('<i', pos, what)
    vt_size = self.scalar('<H', vtable, f'the vtable of {what}')
    table_size = self.scalar('<H', vtable + 2, f'the vtable of {what}')
    if vt_size < 4 or vt_size % 2:
      raise ModelFileError(f'{self.path} is corrupt: {what} has a vtable of {vt_size} bytes')
    self.need(vtable, vt_size, f'the vtable of {what}')
    self.need(pos, max(table_size, 4), what)
    return pos, vtable, vt_size

  def field(self, table: tuple[int, int, int], slot: int) -> int | None:
    """Absolute position of field `slot` of `table`, or None when absent."""
    pos, vtable, vt_size = table
    if 4 + 2 * slot >= vt_size:
      return None
    offset = struct.unpack_from('<H', self.data, vtable + 4 + 2 * slot)[0]
    return pos + offset if offset else None

  def field_scalar(self, table: tuple[int, int, int], slot: int, fmt: str, what: str) -> int:
    pos = self.field(table, slot)
    return 0 if pos is None else self.scalar(fmt, pos, what)

  def vector(self, table: tuple[int, int, int], slot: int, item_size: int, what: str
             ) -> tuple[int, int]:
    """`(first item, length)` of a vector field ((0, 0) when absent), all items in bounds."""
    pos = self.field(table, slot)
    if pos is None:
      return 0, 0
    start = self.follow(pos, f'the offset of {what}')
    length = self.scalar('<I', start, f'the length of {what}')
    self.need(start + 4, length * item_size, f'{what} of {length} items')
    return start + 4, length

  def tables(self, table: tuple[int, int, int], slot: int, what: str
             ) -> list[tuple[int, int, int]]:
    """The tables of a vector-of-tables field, each checked."""
    start, length = self.vector(table, slot, 4, what)
    return [self.table(self.follow(start + 4 * i, f'{what}[{i}]'), f'{what}[{i}]')
            for i in range(length)]


def _describe_foreign(head: bytes) -> str:
  for magic, kind in _FOREIGN:
    if head.startswith(magic):
      return f'; it looks like {kind}'
  return ''


def _root(data: bytes | bytearray, path: str) -> tuple[_Reader, tuple[int, int, int]]:
  """Checks size and identifier; the reader and the root `Model` table."""
  if len(data) == 0:
    raise ModelFileError(f'{path} is not a TFLite model (the file is empty)')
  if len(data) < 8:
    raise ModelFileError(f'{path} is not a TFLite model ({len(data)} bytes; a model has at '
                         'least 8)')
  if bytes(data[4:8]) != b'TFL3':
    raise ModelFileError(f'{path} is not a TFLite model (no TFL3 identifier'
                         f'{_describe_foreign(bytes(data[:4]))})')
  reader = _Reader(data, path)
  return reader, reader.table(reader.follow(0, 'the root table offset'), 'the Model table')


def _buffer_bytes(reader: _Reader, buffer: tuple[int, int, int], what: str) -> bytes:
  """The bytes of one `Buffer` table (inline data, or `offset`/`size` for > 2 GB models)."""
  offset = reader.field_scalar(buffer, _BUFFER_OFFSET, '<Q', f'the offset of {what}')
  if offset:
    size = reader.field_scalar(buffer, _BUFFER_SIZE, '<Q', f'the size of {what}')
    reader.need(offset, size, what)
    return bytes(reader.data[offset:offset + size])
  start, length = reader.vector(buffer, _BUFFER_DATA, 1, what)
  return bytes(reader.data[start:start + length])


def validate_tflite(model: bytes | bytearray, path: str = 'the model') -> None:
  """Raises ModelFileError (one line naming `path`) unless `model` is a sound TFLite file.

  Checks the size (>= 8 bytes), the `TFL3` identifier at bytes 4..8, and that the root table,
  the model's vectors (operator codes, subgraphs and their tensors, operators, inputs and
  outputs, buffers and their data, metadata, signatures) and every offset on the way lie
  inside the file. A deeper corruption is left to the interpreter's own verifier.
  """
  reader, model_table = _root(model, path)
  found = {name: reader.tables(model_table, slot, name)
           for slot, name in _MODEL_VECTORS_OF_TABLES}
  reader.vector(model_table, _MODEL_METADATA_BUFFER, 4, 'metadata_buffer')
  reader.vector(model_table, _MODEL_DESCRIPTION, 1, 'the description')
  for i, graph in enumerate(found['subgraphs']):
    for slot, name in _SUBGRAPH_TABLES:
      reader.tables(graph, slot, f'subgraphs[{i}].{name}')
    for slot, name in _SUBGRAPH_INDICES:
      reader.vector(graph, slot, 4, f'subgraphs[{i}].{name}')
  for i, buffer in enumerate(found['buffers']):
    offset = reader.field_scalar(buffer, _BUFFER_OFFSET, '<Q', f'the offset of buffers[{i}]')
    size = reader.field_scalar(buffer, _BUFFER_SIZE, '<Q', f'the size of buffers[{i}]')
    if offset:
      reader.need(offset, size, f'buffers[{i}]')
    else:
      reader.vector(buffer, _BUFFER_DATA, 1, f'the data of buffers[{i}]')
  names = []
  for i, entry in enumerate(found['metadata']):
    start, length = reader.vector(entry, _METADATA_NAME, 1, f'the name of metadata[{i}]')
    names.append(bytes(model[start:start + length]))
    index = reader.field_scalar(entry, _METADATA_BUFFER, '<I', f'metadata[{i}].buffer')
    if index >= len(found['buffers']):
      raise ModelFileError(f'{path} is corrupt: metadata[{i}] names buffer {index} of '
                           f'{len(found["buffers"])}')
  if STANDARD_METADATA.encode() in names and reader.size > reader.end:
    _check_packed_files(model, reader.end, path)


# Name of the standard TFLite Model Metadata entry. Its writers append the associated files
# (e.g. the labels) to the flatbuffer as a zip archive.
STANDARD_METADATA = 'TFLITE_METADATA'


def _check_packed_files(model: bytes | bytearray, start: int, path: str) -> None:
  """The bytes from `start` on (after the flatbuffer) must be a complete zip archive."""
  try:
    with zipfile.ZipFile(io.BytesIO(bytes(model))) as archive:
      bad = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
    raise ModelFileError(f'{path} is truncated: the files packed after the model (a zip from '
                         f'byte {start} of {len(model)}) are incomplete ({e})') from None
  if bad is not None:
    raise ModelFileError(f'{path} is corrupt: the packed file {bad!r} fails its checksum')


def read_tflite(path: str | os.PathLike) -> bytes:
  """The bytes of the `.tflite` at `path`, validated (`validate_tflite`).

  Raises:
    FileNotFoundError: no such file.
    ModelFileError: unreadable (a folder, no permission), empty, foreign or truncated.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    with open(path, 'rb') as f:
      content = f.read()
  except OSError as e:
    raise ModelFileError(f'{path}: cannot read the model ({e.strerror})') from None
  validate_tflite(content, path)
  return content


def _model(model: bytes | bytearray) -> schema.Model:
  validate_tflite(model)
  return schema.Model.GetRootAs(model, 0)


def op_codes(model: bytes | bytearray) -> list[str]:
  """Operator codes a model declares: builtins by name, custom ops as `CUSTOM:<code>`."""
  m = _model(model)
  names = _builtin_names()
  out = []
  for i in range(m.OperatorCodesLength()):
    code = m.OperatorCodes(i)
    builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
    if builtin == schema.BuiltinOperator.CUSTOM:
      custom = code.CustomCode()
      out.append('CUSTOM:' + (custom.decode() if custom else '?'))
    else:
      out.append(names.get(builtin, f'BUILTIN_{builtin}'))
  return out


def op_names(model: bytes | bytearray, subgraph: int = 0) -> list[str]:
  """Operator names of `subgraph` in execution order (one entry per node)."""
  m = _model(model)
  codes = op_codes(model)
  g = m.Subgraphs(subgraph)
  return [codes[g.Operators(i).OpcodeIndex()] for i in range(g.OperatorsLength())]


def op_histogram(model: bytes | bytearray) -> dict[str, int]:
  """`{op name: count}` over the main subgraph, most frequent first."""
  return dict(Counter(op_names(model)).most_common())


def non_builtin_ops(model: bytes | bytearray) -> list[str]:
  """Custom and Flex (TF select) ops, which a stock LiteRT runtime cannot run; [] when clean."""
  return sorted({c for c in op_codes(model) if c.startswith('CUSTOM:')})


def tensor_types(model: bytes | bytearray, subgraph: int = 0) -> dict[str, int]:
  """`{tensor type name: count}` of the subgraph's tensors (e.g. how many stay FLOAT32)."""
  m = _model(model)
  g = m.Subgraphs(subgraph)
  names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith('_')}
  return dict(Counter(names.get(g.Tensors(i).Type(), '?') for i in range(g.TensorsLength())))


def read_metadata(model: bytes | bytearray, name: str, path: str = 'the model'
                  ) -> bytes | None:
  """The bytes stored under metadata entry `name`, or None when the model has none.

  Raises:
    ModelFileError: `model` is not a TFLite file, or is truncated or corrupt (one line naming
      `path`; `validate_tflite`); never a `struct.error` or `IndexError`.
  """
  try:
    validate_tflite(model, path)
    reader, model_table = _root(model, path)
    for i, entry in enumerate(reader.tables(model_table, _MODEL_METADATA, 'metadata')):
      start, length = reader.vector(entry, _METADATA_NAME, 1, f'the name of metadata[{i}]')
      if not length or bytes(model[start:start + length]).decode('utf-8', 'replace') != name:
        continue
      index = reader.field_scalar(entry, _METADATA_BUFFER, '<I', f'metadata[{i}].buffer')
      buffers = reader.tables(model_table, _MODEL_BUFFERS, 'buffers')
      if index >= len(buffers):
        raise ModelFileError(f'{path} is corrupt: metadata {name!r} names buffer {index} of '
                             f'{len(buffers)}')
      return _buffer_bytes(reader, buffers[index], f'the metadata {name!r}')
    return None
  except (struct.error, IndexError, OverflowError) as e:  # a gap in the checks above
    raise ModelFileError(f'{path} is truncated or corrupt: {e}') from None


def add_metadata(model: bytes | bytearray, name: str, data: bytes) -> bytes:
  """A copy of `model` with metadata entry `name` set to `data` (replaced if present).

  Metadata entries are ignored by the interpreter; they travel with the file, so an app (or
  `kdflax predict`) can read the labels and the input format from the model itself.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  for buf in obj.buffers:
    if buf.offset:
      raise ValueError('models with offset buffers (> 2 GB) cannot be annotated')
  obj.metadata = [e for e in (obj.metadata or []) if e.name not in (name, name.encode())]
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(bytes(data), dtype=np.uint8)
  obj.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name = name
  entry.buffer = len(obj.buffers) - 1
  obj.metadata.append(entry)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def dequantize_uint8_inputs(model: bytes | bytearray) -> bytes:
  """A copy of `model` whose uint8 -> float32 CASTs of graph inputs are DEQUANTIZE ops.

  jax2tf turns `image.astype(float32)` into CAST, which XNNPACK does not take: LiteRT runs it
  with its scalar builtin kernel, 1.5-3% of MobileNetV3-Large's fp32 latency at 224 px (one
  thread; `docs/benchmarks.md`). The input tensor is given the identity quantization
  (scale 1, zero point 0), under which DEQUANTIZE computes exactly `float(q)` and XNNPACK runs
  it as a vectorised convert. The app still feeds raw uint8 pixels; the values are unchanged.
  Other CASTs are left alone; a model with none is returned unchanged.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  codes = obj.operatorCodes
  changed = False
  for graph in obj.subgraphs:
    inputs = {int(i) for i in graph.inputs}
    for op in graph.operators:
      if flatbuffer_utils.get_builtin_code_from_operator_code(
          codes[op.opcodeIndex]) != schema.BuiltinOperator.CAST:
        continue
      src, dst = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
      if (int(op.inputs[0]) not in inputs or src.type != schema.TensorType.UINT8
          or dst.type != schema.TensorType.FLOAT32
          or (src.quantization is not None and src.quantization.scale is not None
              and len(src.quantization.scale))):
        continue
      op.opcodeIndex = _opcode_index(codes, schema.BuiltinOperator.DEQUANTIZE)
      op.builtinOptionsType = schema.BuiltinOptions.NONE
      op.builtinOptions = None
      quant = schema.QuantizationParametersT()
      quant.scale = np.ones(1, np.float32)
      quant.zeroPoint = np.zeros(1, np.int64)
      src.quantization = quant
      changed = True
  if not changed:
    return bytes(model)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def append_softmax(model: bytes | bytearray) -> bytes:
  """A copy of `model` whose single float32 `(B, K)` output goes through a float SOFTMAX.

  For full-int8 classifiers: the converter would quantize a softmax in the graph (int8
  SOFTMAX, output steps of 1/256, so close classes tie, and XNNPACK does not take it: a
  second delegate partition). Appended after the final DEQUANTIZE it runs in float, on
  XNNPACK, in the same partition. The signature's output keeps its name and now names the
  new tensor.

  Raises:
    ValueError: the model does not have exactly one float32 output.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  graph = obj.subgraphs[0]
  if len(graph.outputs) != 1:
    raise ValueError(f'append_softmax: expected one output, found {len(graph.outputs)}')
  src = int(graph.outputs[0])
  logits = graph.tensors[src]
  if logits.type != schema.TensorType.FLOAT32:
    raise ValueError('append_softmax: the output is not float32')
  buffer = schema.BufferT()
  obj.buffers.append(buffer)
  out = schema.TensorT()
  out.shape = np.array(logits.shape, np.int32)
  if logits.shapeSignature is not None:
    out.shapeSignature = np.array(logits.shapeSignature, np.int32)
  out.type = schema.TensorType.FLOAT32
  out.buffer = len(obj.buffers) - 1
  out.name = 'softmax_output'
  graph.tensors.append(out)
  dst = len(graph.tensors) - 1
  op = schema.OperatorT()
  op.opcodeIndex = _opcode_index(obj.operatorCodes, schema.BuiltinOperator.SOFTMAX)
  op.inputs = np.array([src], np.int32)
  op.outputs = np.array([dst], np.int32)
  op.builtinOptionsType = schema.BuiltinOptions.SoftmaxOptions
  op.builtinOptions = schema.SoftmaxOptionsT()
  op.builtinOptions.beta = 1.0
  graph.operators.append(op)
  graph.outputs = np.array([dst], np.int32)
  for signature in obj.signatureDefs or []:
    for entry in signature.outputs or []:
      if entry.tensorIndex == src:
        entry.tensorIndex = dst
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def _opcode_index(codes: list, builtin: int) -> int:
  """Index of `builtin` in the model's operator codes, appended (version 1) if absent."""
  for i, code in enumerate(codes):
    if flatbuffer_utils.get_builtin_code_from_operator_code(code) == builtin:
      return i
  code = schema.OperatorCodeT()
  code.builtinCode = builtin
  code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
  code.version = 1
  codes.append(code)
  return len(codes) - 1
