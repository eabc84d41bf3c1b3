"""Depthwise convolution as an XLA:CPU custom call (`depthwise_cpu.cc`), with its own gradients.

    y = depthwise_cpu(x, kernel, stride)    # (B, H, W, C), (k, k, 1, C) -> (B, Ho, Wo, C)

The same function as `kdflax.models.depthwise.depthwise_conv` (padding k // 2, float32
arithmetic; inputs of another dtype are computed in float32 and cast back), differentiable in
both arguments through a `jax.custom_vjp` whose backward pass calls the input-gradient and
kernel-gradient kernels. CPU only.

The C++ source ships with the package and is compiled on first use with the machine's C++
compiler (`$CXX`, else `c++` / `g++` / `clang++`) against the XLA FFI headers jaxlib ships,
into `$KDFLAX_CACHE_DIR/kernels` (default `~/.cache/kdflax/kernels`; a temporary folder when
that is not writable). The library's name carries a hash of the source, the compiler
command, jaxlib's version and the CPU's features, so a cached build is never used against
anything else; it is written to a temporary name and renamed, so a build killed midway is
never loaded. `available()` says whether the kernel could be built and loaded; 'auto' in
`kdflax.models.depthwise` falls back to the shifted-slices form when it cannot.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from kdflax.cache_dir import cache_dir as kdflax_cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'depthwise_cpu.cc')
TARGETS = {  # FFI target name -> exported handler symbol
    'kdflax_depthwise_forward': 'KdflaxDepthwiseForward',
    'kdflax_depthwise_input_grad': 'KdflaxDepthwiseInputGrad',
    'kdflax_depthwise_kernel_grad': 'KdflaxDepthwiseKernelGrad',
}
_LOCK = threading.Lock()


class KernelBuildError(RuntimeError):
  """The depthwise CPU kernel could not be compiled or loaded (the message says why)."""


def cache_dir() -> str:
  """Folder the compiled kernels go to: `$KDFLAX_CACHE_DIR/kernels` or `~/.cache/kdflax/kernels`."""
  return kdflax_cache_dir('kernels')


def compiler() -> str | None:
  """The C++ compiler to build with: `$CXX` if set, else the first of c++, g++, clang++ found."""
  if os.environ.get('CXX'):
    return shutil.which(os.environ['CXX'])
  for name in ('c++', 'g++', 'clang++'):
    found = shutil.which(name)
    if found:
      return found
  return None


def _cpu_features() -> str:
  """The CPU's feature flags (Linux), or the processor name: part of the build's identity."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      for line in f:
        if line.startswith(('flags', 'Features')):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def build_command(cxx: str, output: str) -> list[str]:
  """The compiler command that builds `SOURCE` into the shared library `output`."""
  return [cxx, '-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w',
          f'-I{jax.ffi.include_dir()}', SOURCE, '-o', output]


def _library_name(cxx: str) -> str:
  """The build's file name: a hash of the source, compiler command, jaxlib and CPU features."""
  import jaxlib  # noqa: PLC0415  (only its version)
  digest = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    digest.update(f.read())
  for part in (' '.join(build_command(cxx, 'OUT')), jaxlib.__version__, _cpu_features()):
    digest.update(part.encode())
  return f'depthwise_cpu-{digest.hexdigest()[:16]}.so'


def _compile(cxx: str, path: str) -> None:
  """Compiles `SOURCE` to `path` atomically (a temporary name in the same folder, renamed)."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.tmp-', dir=folder)
  os.close(fd)
  try:
    result = subprocess.run(build_command(cxx, tmp), capture_output=True, text=True,
                            timeout=300, check=False)
    if result.returncode != 0:
      last = (result.stderr.strip().splitlines() or ['no output'])[-1]
      raise KernelBuildError(f'compiling {SOURCE} with {cxx} failed: {last}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def build_library() -> str:
  """Path of a loadable build of `SOURCE`, compiling it first when the cache has none.

  Tries `cache_dir()`, then a folder in the system's temporary directory (e.g. a read-only
  home). A cached file that does not load (a damaged build) is replaced. Raises
  `KernelBuildError` with a one-line reason.
  """
  cxx = compiler()
  if cxx is None:
    raise KernelBuildError('no C++ compiler found (set CXX, or install g++ or clang++)')
  name = _library_name(cxx)
  problems = []
  for folder in (cache_dir(), os.path.join(tempfile.gettempdir(), 'kdflax-kernels')):
    path = os.path.join(folder, name)
    try:
      if os.path.exists(path):
        try:
          ctypes.CDLL(path)
          return path
        except OSError:  # a damaged cached build: build it again
          os.remove(path)
      _compile(cxx, path)
      ctypes.CDLL(path)
      return path
    except (OSError, subprocess.SubprocessError) as e:  # e.g. a read-only cache folder
      problems.append(f'{folder}: {e}')
  raise KernelBuildError('building the depthwise CPU kernel failed: ' + '; '.join(problems))


@functools.cache
def _registered() -> ctypes.CDLL | str:
  """The library whose handlers are registered as XLA:CPU FFI targets, or why there is none.

  Once per process (XLA keeps the first registration of a target name).
  """
  with _LOCK:
    try:
      library = ctypes.CDLL(build_library())
    except KernelBuildError as e:
      return str(e)
    except OSError as e:
      return f'loading the depthwise CPU kernel failed: {e}'
    for target, symbol in TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform='cpu')
    return library


def library() -> ctypes.CDLL:
  """Builds (once per machine), loads and registers the kernels; raises `KernelBuildError`."""
  registered = _registered()
  if isinstance(registered, str):
    raise KernelBuildError(registered)
  return registered


def available() -> bool:
  """Whether the kernel builds and loads here (the reason is logged once when it does not)."""
  registered = _registered()
  if isinstance(registered, str):
    _log_once(registered)
    return False
  return True


@functools.cache
def _log_once(message: str) -> None:
  logging.warning('depthwise CPU kernel unavailable, using the shifted-slices form: %s',
                  message)


def _out_hw(h: int, w: int, k: int, stride: int) -> tuple[int, int]:
  pad = k // 2
  return (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1


def _call(target: str, shape: tuple[int, ...], *args: jax.Array, stride: int) -> jax.Array:
  library()
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method='sequential')(*args, stride=np.int64(stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_f32(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  b, h, w, c = x.shape
  ho, wo = _out_hw(h, w, kernel.shape[0], stride)
  return _call('kdflax_depthwise_forward', (b, ho, wo, c), x, kernel, stride=stride)


def _forward(x, kernel, stride):
  return _depthwise_f32(x, kernel, stride), (x, kernel)


def _backward(stride, residuals, dy):
  x, kernel = residuals
  dx = _call('kdflax_depthwise_input_grad', x.shape, dy, kernel, stride=stride)
  dkernel = _call('kdflax_depthwise_kernel_grad', kernel.shape, x, dy, stride=stride)
  return dx, dkernel


_depthwise_f32.defvjp(_forward, _backward)


def depthwise_cpu(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv through the CPU kernel; `(B,H,W,C)`, `(k,k,1,C)` -> `(B,Ho,Wo,C)`.

  Pads `k // 2` on every side, like `depthwise_conv`. Raises `KernelBuildError` when the
  kernel cannot be built. Computes in float32 and returns `x`'s dtype.
  """
  if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
    raise ValueError(f'depthwise_cpu wants x (B,H,W,C) and kernel (k,k,1,C), got {x.shape} '
                     f'and {kernel.shape}')
  dtype = jnp.result_type(x, kernel)
  y = _depthwise_f32(x.astype(jnp.float32), kernel.astype(jnp.float32), int(stride))
  return y.astype(dtype)
