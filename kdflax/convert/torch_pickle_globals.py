"""What a `torch.save` pickle may reach (for `kdflax.convert.torch_pickle`): the allow-list.

A pickle reaches a callable only through `Unpickler.find_class` and a storage only through
`Unpickler.persistent_load`; this module holds both ends:

- `_Unpickler`, whose `find_class` looks names up in `_ALLOWED` (after pickle's own Python 2
  renames) and refuses every other global with a `TorchPickleError` before it is looked up;
- the stand-ins `_ALLOWED` maps names to, all sealed against the BUILD opcode (`_Sealed`): the
  tensor-rebuild functions (`torch._utils._rebuild_tensor_v2` & co.), which return a
  `_TensorRef` placeholder; torch dtypes (`_DType`, `_DTYPES`), typed and untyped storage
  classes (`_StorageType`), `torch.Tensor`/`nn.Parameter` tokens (`_Class`), `torch.Size`,
  `torch.device`, `_codecs.encode`, and a few immutable built-in types;
- `_Storages`, the persistent-id handler that turns `('storage', type, key, location, numel)`
  (and legacy storage views) into `_Storage` placeholders whose bytes the format readers fill in;
- `TorchPickleError`, the one error class, re-exported by `kdflax.convert.torch_pickle`.

Nothing here reads a file or imports torch; `torch_pickle` reads both file formats and turns
the placeholders into NumPy arrays.
"""

from __future__ import annotations

import _compat_pickle
import collections
import dataclasses
import pickle
import types
from collections.abc import Callable
from typing import IO, Any

import numpy as np


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
