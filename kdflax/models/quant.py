"""Simulated int8 for quantisation-aware training (QAT): the rounding a full-int8 `.tflite` does.

    y = fake_quant_kernel(kernel)          # per output channel (last axis), symmetric, int8
    y = ActRange(name='q_out')(x, update=train)   # per tensor, asymmetric, int8

TFLite's full-integer model keeps every convolution / Dense kernel as int8 with one symmetric
scale per output channel (after folding BatchNorm into it) and every activation tensor as
int8 with one (scale, zero point) from its calibrated range. Training through the same
rounding, with straight-through gradients, teaches the float weights to keep their decisions
when the converter rounds them; the exported graph is the ordinary float model, calibrated
and quantised by the converter as usual.

Rounding the unfolded kernel is exactly the rounding of the BN-folded kernel the converter
writes: per-channel symmetric rounding is unchanged by a per-channel scale (BN's
gamma / sqrt(var + eps)), whatever its sign.

Activation ranges are running statistics kept in the `batch_stats` collection (the first
training batch sets them, later batches move them by an exponential average), so they travel
with the BatchNorm statistics through the train state, checkpoints and model directories; a
float model given these variables ignores them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# The names of an `ActRange`'s variables; a float checkpoint lacks them (`is_range_variable`).
RANGE_VARIABLES = ('range_min', 'range_max', 'range_seen')
RANGE_DECAY = 0.95
_LEVELS = 255.0   # int8: 256 levels
_KERNEL_MAX = 127.0   # symmetric int8 weights: -127..127


def is_range_variable(path: str) -> bool:
  """True for a '/'-joined variable path that names an `ActRange` statistic."""
  return path.rsplit('/', 1)[-1] in RANGE_VARIABLES


def _straight_through(x: jax.Array, rounded: jax.Array) -> jax.Array:
  """`rounded` forward, identity gradient (to `x`) backward."""
  return x + lax.stop_gradient(rounded - x)


def fake_quant_kernel(kernel: jax.Array) -> jax.Array:
  """Rounds `kernel` to int8 with one symmetric scale per output channel (the last axis).

  `(..., C_out)` -> same shape and dtype; the gradient passes straight through.
  """
  reduce = tuple(range(kernel.ndim - 1))
  scale = jnp.max(jnp.abs(kernel), axis=reduce, keepdims=True) / _KERNEL_MAX
  scale = jnp.where(scale > 0, scale, 1.0)
  rounded = jnp.clip(jnp.round(kernel / scale), -_KERNEL_MAX, _KERNEL_MAX) * scale
  return _straight_through(kernel, lax.stop_gradient(rounded))


def fake_quant_range(x: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
  """Rounds `x` to the 256 levels spanning `[low, high]` (widened to contain 0, as TFLite does).

  Values outside the range are clipped (their gradient is 0); inside, the gradient passes
  straight through. Zero is represented exactly (the zero point is an integer).
  """
  low = jnp.minimum(lax.stop_gradient(low), 0.0)
  high = jnp.maximum(lax.stop_gradient(high), 0.0)
  scale = jnp.maximum(high - low, 1e-8) / _LEVELS
  zero_point = jnp.round(-low / scale)
  clipped = jnp.clip(x, (0.0 - zero_point) * scale, (_LEVELS - zero_point) * scale)
  rounded = jnp.round(clipped / scale) * scale
  return _straight_through(clipped, lax.stop_gradient(rounded))


class ActRange(nn.Module):
  """Per-tensor int8 fake quantisation of an activation with a running range; shape kept.

  With `update=True` (training, `batch_stats` mutable) the range follows the batch's min and
  max (set by the first batch, then an exponential average with `decay`); otherwise the stored
  range is used (or the batch's own range before any training step).
  """

  decay: float = RANGE_DECAY

  @nn.compact
  def __call__(self, x: jax.Array, update: bool = False) -> jax.Array:
    zeros = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
    low = self.variable('batch_stats', 'range_min', zeros)
    high = self.variable('batch_stats', 'range_max', zeros)
    seen = self.variable('batch_stats', 'range_seen', zeros)
    batch_low = lax.stop_gradient(jnp.min(x).astype(jnp.float32))
    batch_high = lax.stop_gradient(jnp.max(x).astype(jnp.float32))
    if self.is_initializing():
      return x
    first = seen.value == 0
    if update:
      low.value = jnp.where(first, batch_low, self.decay * low.value + (1 - self.decay) * batch_low)
      high.value = jnp.where(first, batch_high,
                             self.decay * high.value + (1 - self.decay) * batch_high)
      seen.value = seen.value + 1
      use_low, use_high = low.value, high.value
    else:
      use_low = jnp.where(first, batch_low, low.value)
      use_high = jnp.where(first, batch_high, high.value)
    out = fake_quant_range(x.astype(jnp.float32), use_low, use_high)
    return out.astype(x.dtype)


def quantized_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any,
                                   **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated` with the kernel (HWIO) rounded per output channel."""
  return lax.conv_general_dilated(lhs, fake_quant_kernel(rhs), *args, **kwargs)


def quantized_dot_general(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
  """`lax.dot_general` with a Dense kernel `(in, out)` rounded per output column."""
  return lax.dot_general(lhs, fake_quant_kernel(rhs), *args, **kwargs)
