"""Rewrite 2, lazy constant scales: a factor travels with the value until weights absorb it.

A multiplication or division by a constant is not emitted; the factor travels with the value
(`Scaled`) through linear ops (reshape, pad, sums, products, adding constants) until a
convolution or Dense with constant weights absorbs it into the weights. This removes the
input's x/255 and /std passes, the 1/(H*W) of every mean and the 1/6 of every hard-sigmoid
and int8 hard-swish. Where a factor cannot be absorbed it is applied as an ordinary multiply
(`materialize`). `lowering.rewrite` calls `start_scale` on each equation of the input's
dataflow and `propagate` on each one that takes a `Scaled` value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdflax.export.channel_broadcast import BINARY, broadcast_op, last_axis_vector


@dataclasses.dataclass(frozen=True)
class Scaled:
  """A traced value whose true value is `value * scale` (scale: scalar or per last axis)."""

  value: Any
  scale: Any  # float or np.ndarray of shape (C,)

  @property
  def vector(self) -> bool:
    return np.ndim(self.scale) > 0


def materialize(v: Any) -> Any:
  """The true value of `v` (a `Scaled` value multiplied out; anything else as it is)."""
  if not isinstance(v, Scaled):
    return v
  if not v.vector:
    return v.value * np.asarray(v.scale, v.value.dtype)
  return broadcast_op(jnp.multiply, v.value, np.asarray(v.scale, v.value.dtype))


def is_traced(v: Any) -> bool:
  """Whether `v` depends on the input (a tracer, plain or lazily scaled)."""
  return isinstance(v, (jax.core.Tracer, Scaled))


def _scalar(v: Any) -> float | None:
  if is_traced(v) or np.size(v) != 1:
    return None
  return float(np.asarray(v).reshape(()))


def _absorb_conv(eqn, x: Scaled, rhs: Any) -> list | None:
  """conv(x * s, W) = conv(x, W * s): s scalar, or per input channel when ungrouped."""
  params = dict(eqn.params)
  dn = params['dimension_numbers']
  rhs = np.asarray(rhs)
  if not x.vector:
    new_rhs = rhs * np.asarray(x.scale, rhs.dtype)
  else:
    if params['feature_group_count'] != 1 or params['batch_group_count'] != 1:
      return None
    if dn.lhs_spec[1] != x.value.ndim - 1 or rhs.shape[dn.rhs_spec[1]] != np.size(x.scale):
      return None
    shape = [1] * rhs.ndim
    shape[dn.rhs_spec[1]] = np.size(x.scale)
    new_rhs = rhs * np.asarray(x.scale, rhs.dtype).reshape(shape)
  with eqn.ctx.manager:
    return [eqn.primitive.bind(x.value, new_rhs, **params)]


def _bind(eqn, *args):
  """`eqn`'s primitive applied to `args` with its own params, in its context."""
  with eqn.ctx.manager:
    return eqn.primitive.bind(*args, **eqn.params)


def _out_shape(eqn) -> tuple[int, ...]:
  return tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()


def _scaled_positions(invals: Sequence) -> list[int]:
  return [i for i, v in enumerate(invals) if isinstance(v, Scaled)]


def _through_conv(eqn, invals: Sequence) -> list | None:
  """conv(x * s, W) with constant W: the scale goes into the weights (`_absorb_conv`)."""
  if _scaled_positions(invals) == [0] and not is_traced(invals[1]):
    return _absorb_conv(eqn, invals[0], invals[1])
  return None


def _through_dot(eqn, invals: Sequence) -> list | None:
  """dot(x * s, C) with constant C and scalar s: the scale goes into C."""
  scaled = _scaled_positions(invals)
  if len(scaled) != 1 or is_traced(invals[1 - scaled[0]]):
    return None
  x = invals[scaled[0]]
  if x.vector:
    return None
  const = np.asarray(invals[1 - scaled[0]])
  const = const * np.asarray(x.scale, const.dtype)
  args = (x.value, const) if scaled[0] == 0 else (const, x.value)
  return [_bind(eqn, *args)]


# Linear in their first operand: op(x * s, ...) = op(x, ...) * s (for `pad`, a zero pad value).
_LINEAR = ('reshape', 'broadcast_in_dim', 'squeeze', 'expand_dims', 'transpose', 'copy',
           'reduce_sum', 'slice', 'pad', 'convert_element_type')


def _through_linear(eqn, invals: Sequence) -> list | None:
  """A `_LINEAR` op on `x * s`: the op on x, the scale kept lazy."""
  name = eqn.primitive.name
  params = eqn.params
  out_shape = _out_shape(eqn)
  if _scaled_positions(invals) != [0]:
    return None
  x = invals[0]
  if name == 'pad' and _scalar(invals[1]) != 0.0:
    return None
  if name == 'convert_element_type' and not jnp.issubdtype(params['new_dtype'], jnp.floating):
    return None
  if x.vector:  # per-channel factors survive only ops that keep the last axis in place
    keeps_last = (len(out_shape) == x.value.ndim and out_shape[-1] == x.value.shape[-1]
                  and name in ('pad', 'reduce_sum', 'reshape', 'convert_element_type',
                               'copy'))
    if name == 'reduce_sum' and x.value.ndim - 1 in params['axes']:
      keeps_last = False
    if not keeps_last:
      return None
  return [Scaled(_bind(eqn, x.value, *invals[1:]), x.scale)]


def _scale_product(eqn, invals: Sequence) -> list | None:
  """`mul` / `div` with a lazily scaled operand: constant factors join the scale."""
  name = eqn.primitive.name
  out_shape = _out_shape(eqn)
  if name == 'div' and len(_scaled_positions(invals)) != 1:
    return None
  a, b = invals
  if name == 'div' and isinstance(b, Scaled):
    return None
  x, c = (a, b) if isinstance(a, Scaled) else (b, a)
  if not is_traced(c) and (name == 'mul' or x is a):
    # (x*s) * c = x * (s*c): a constant factor along the last axis joins the scale.
    vec = last_axis_vector(c, out_shape)
    if vec is not None and np.all(vec != 0) and tuple(x.value.shape) == out_shape:
      factor = vec if name == 'mul' else 1.0 / vec
      if np.allclose(factor, factor.reshape(-1)[0], rtol=0, atol=0):
        factor = float(factor.reshape(-1)[0])
      scale = np.asarray(x.scale) * factor
      return [Scaled(x.value, scale if np.ndim(scale) else float(scale))]
  sa = a.scale if isinstance(a, Scaled) else 1.0
  sb = b.scale if isinstance(b, Scaled) else 1.0
  if np.ndim(sa) and np.ndim(sb):
    return None
  va, vb = (x.value if isinstance(x, Scaled) else x for x in (a, b))
  scale = np.asarray(sa) * np.asarray(sb) if (np.ndim(sa) or np.ndim(sb)) else sa * sb
  if np.ndim(scale) and out_shape[-1:] != np.shape(scale):
    return None
  return [Scaled(_bind(eqn, va, vb), scale)]


def _scale_sum(eqn, invals: Sequence) -> list | None:
  """`add` / `sub` with a lazily scaled operand: the other operand is divided by the scale."""
  name = eqn.primitive.name
  out_shape = _out_shape(eqn)
  a, b = invals
  if isinstance(a, Scaled) and isinstance(b, Scaled):
    if np.shape(a.scale) != np.shape(b.scale) or not np.allclose(a.scale, b.scale, rtol=0):
      return None
    return [Scaled(_bind(eqn, a.value, b.value), a.scale)]
  x, c = (a, b) if isinstance(a, Scaled) else (b, a)
  if is_traced(c):
    if x.vector:
      return None
    # x*s + y = (x + y/s) * s: y/s is a multiply by a constant, which the converter fuses
    # into y's convolution (a residual branch); the scale stays lazy for the next weights.
    y = c * np.asarray(1.0 / x.scale, c.dtype)
    args = (x.value, y) if x is a else (y, x.value)
    return [Scaled(_bind(eqn, *args), x.scale)]
  # x*s + c = (x + c/s) * s, with c/s a constant.
  c = np.asarray(c)
  scale = np.asarray(x.scale, c.dtype if c.dtype.kind == 'f' else np.float32)
  shifted = (c / scale).astype(c.dtype) if c.dtype.kind == 'f' else None
  if shifted is None or (np.ndim(scale) and np.shape(np.broadcast_to(shifted, out_shape))
                         [-1:] != np.shape(scale)):
    return None
  if np.size(shifted) > 1 and x.value.ndim == 4 and x.value.shape[-1] <= 4:
    vec = last_axis_vector(shifted, out_shape)
    if vec is not None:  # the wide-view trick for the image's per-channel offset
      return [Scaled(broadcast_op(BINARY[name], x.value, vec.astype(c.dtype),
                                    const_first=x is b), x.scale)]
  args = (x.value, shifted) if x is a else (shifted, x.value)
  if name == 'sub' and x is b:  # c - x*s = (c/s - x) * s
    args = (shifted, x.value)
  return [Scaled(_bind(eqn, *args), x.scale)]


# Primitive -> how a lazy scale passes through it; any other primitive materializes it.
_SCALE_RULES: Mapping[str, Callable[..., list | None]] = {
    'conv_general_dilated': _through_conv,
    'dot_general': _through_dot,
    **dict.fromkeys(_LINEAR, _through_linear),
    'mul': _scale_product,
    'div': _scale_product,
    'add': _scale_sum,
    'sub': _scale_sum,
}


def propagate(eqn, invals: Sequence) -> list | None:
  """Evaluates `eqn` keeping (or absorbing) lazy scales; None to fall back to materializing."""
  rule = _SCALE_RULES.get(eqn.primitive.name)
  return None if rule is None else rule(eqn, invals)


def start_scale(eqn, invals: Sequence) -> list | None:
  """`x * c` or `x / c` with a scalar constant c -> a lazy scale instead of an op."""
  if eqn.primitive.name not in ('mul', 'div'):
    return None
  a, b = invals
  if isinstance(a, jax.core.Tracer) and _scalar(b) is not None:
    c = _scalar(b)
    if c == 0.0 or not jnp.issubdtype(a.dtype, jnp.floating):
      return None
    return [Scaled(a, c if eqn.primitive.name == 'mul' else 1.0 / c)]
  if eqn.primitive.name == 'mul' and isinstance(b, jax.core.Tracer) and _scalar(a) is not None:
    if not jnp.issubdtype(b.dtype, jnp.floating):
      return None
    return [Scaled(b, _scalar(a))]
  return None
