"""Bounds-checked reading of `.tflite` flatbuffers, without running them.

Files from elsewhere are checked before use: `read_tflite(path)` (or `validate_tflite(bytes,
path)`) raises `ModelFileError`, a `ValueError` with a one-line message naming the file, for an
empty or foreign file (no `TFL3` identifier) and for a truncated one (an offset of the model's
tables, vectors or buffers points past the end of the file, or, in a file with standard
metadata, the zip of packed files after the flatbuffer is incomplete). A file cut exactly at
the flatbuffer's end is a complete model that lost its packed files, as when a tool rewrites
the flatbuffer: it passes, and its labels come from elsewhere.

    content = read_tflite('student.tflite')    # bytes, validated
    read_metadata(content, 'kdflax')           # -> the bytes of metadata entry 'kdflax', or None

What a model contains (op list, tensor types) is in `inventory.py`; copies of a model with
one change (a metadata entry, the DEQUANTIZE input, a float SOFTMAX) in `flatbuffer_edits.py`.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile


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
