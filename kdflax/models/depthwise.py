"""Depthwise convolution with a choice of implementation, same parameters as `nn.Conv`.

    conv = DepthwiseConv(kernel_size=3, strides=2, impl='auto', name='conv_dw')
    y = conv(x)            # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C), symmetric pad k // 2

The parameter is `kernel` of shape `(k, k, 1, C)`, exactly what
`nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)` creates (same initializer, same
RNG use), so checkpoints, timm conversion and tests do not see which implementation ran.

Implementations:
  'conv'     `lax.conv_general_dilated` with `feature_group_count=C`. What TPUs and GPUs run
             well, and what jax2tf -> TFLite turns into DEPTHWISE_CONV_2D (export uses it).
  'shifted'  the same arithmetic as a sum over the k*k taps of strided slices of the padded
             input times that tap's per-channel weights, in plain JAX. XLA:CPU runs grouped
             convolutions through a slow generic path; measured on 2 cores, (16, 56, 56, 72),
             3x3 (`tools/bench_depthwise.py`): forward 69 -> 1.7 ms, forward + both gradients
             199 -> 50 ms.
  'cpu_kernel'  an XLA:CPU custom call with hand-written forward, input-gradient and
             kernel-gradient loops (`kdflax.models.depthwise_cpu`, compiled on first use):
             the kernel gradient, which autodiff of 'shifted' turns into k*k full-size
             reductions, becomes one pass. Same layer: forward 1.5 ms, forward + both
             gradients 5.9 ms. CPU only.
  'auto'     'cpu_kernel' when the default backend is the CPU and the kernel builds there,
             else 'shifted' on the CPU and 'conv' elsewhere (decided at trace time).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kdflax.models import depthwise_cpu
from kdflax.models.quant import fake_quant_kernel

IMPLS = ('auto', 'conv', 'shifted', 'cpu_kernel')


def check_impl(impl: str) -> str:
  """`impl` if it is one of `IMPLS`, else a ValueError naming the choices (builds nothing)."""
  if impl not in IMPLS:
    raise ValueError(f'depthwise implementation must be one of {IMPLS}, got {impl!r}')
  return impl


def resolve_impl(impl: str) -> str:
  """'conv', 'shifted' or 'cpu_kernel' for `impl` in `IMPLS` ('auto' picks by backend).

  On the CPU, 'auto' builds the CPU kernel the first time it is asked (a few seconds, once per
  machine) and falls back to 'shifted' when that is not possible.
  """
  on_cpu = jax.default_backend() == 'cpu'
  if check_impl(impl) == 'auto':
    if not on_cpu:
      return 'conv'
    return 'cpu_kernel' if depthwise_cpu.available() else 'shifted'
  if impl == 'cpu_kernel' and not on_cpu:
    raise ValueError(f"depthwise implementation 'cpu_kernel' runs on the CPU only; the default "
                     f"backend is {jax.default_backend()} (use 'auto' or 'conv')")
  return impl


def depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv as a sum of shifted slices; `(B,H,W,C)`, `(k,k,1,C)` -> `(B,Ho,Wo,C)`.

  Pads `k // 2` on every side (PyTorch style), like `depthwise_conv`.
  """
  k = kernel.shape[0]
  pad = k // 2
  b, h, w, c = x.shape
  ho = (h + 2 * pad - k) // stride + 1
  wo = (w + 2 * pad - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      end = (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c)
      tap = lax.slice(xp, (0, i, j, 0), end, (1, stride, stride, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """Depthwise conv as one grouped convolution; `(B,H,W,C)`, `(k,k,1,C)` -> `(B,Ho,Wo,C)`."""
  pad = kernel.shape[0] // 2
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


class DepthwiseConv(nn.Module):
  """Bias-free depthwise k x k convolution, padding k // 2; `(B,H,W,C)` -> `(B,Ho,Wo,C)`.

  Attributes:
    kernel_size: k (square kernel).
    strides: stride in both spatial dimensions.
    impl: 'auto', 'conv', 'shifted' or 'cpu_kernel' (see the module docstring).
    quantize: round the kernel to int8 per channel (`kdflax.models.quant.fake_quant_kernel`).
    dtype: compute dtype (None: the promoted dtype of input and kernel, as `nn.Conv`).
    param_dtype: kernel dtype.
  """

  kernel_size: int
  strides: int = 1
  impl: str = 'auto'
  quantize: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', self.kernel_init, (k, k, 1, c), self.param_dtype)
    if self.quantize:  # int8 per channel, as the full-int8 `.tflite` stores it
      kernel = fake_quant_kernel(kernel)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    impl = resolve_impl(self.impl)
    if impl == 'cpu_kernel':
      return depthwise_cpu.depthwise_cpu(x, kernel, self.strides)
    if impl == 'shifted':
      return depthwise_shifted(x, kernel, self.strides)
    return depthwise_conv(x, kernel, self.strides)


def reference_form(module: nn.Module) -> nn.Module:
  """`module` with its depthwise convolutions as grouped convolutions ('conv'), in float.

  The form whose jaxpr counts MACs by convolution and exports to TFLite DEPTHWISE_CONV_2D:
  simulated int8 (`quantize`, for quantisation-aware training) is switched off, since the
  converter does the rounding. A module without these fields is returned as is.
  """
  changes = {}
  if hasattr(module, 'depthwise'):
    changes['depthwise'] = 'conv'
  if getattr(module, 'quantize', False):
    changes['quantize'] = False
  return module.clone(**changes) if changes else module
