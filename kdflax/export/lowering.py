"""Export-time rewrites: the same function, expressed with ops LiteRT runs fast.

The serving function is traced to a jaxpr and re-evaluated with three rewrites (each exact in
real arithmetic; float results differ by rounding only). Measured with ai-edge-litert 2.3.0 /
XNNPACK on MobileNetV3-Large at 224 px, batch 1, 1 thread (see docs/export.md):

1. int8 hard-swish (`INT8_CALLS`). `jax.nn.hard_swish` (alias `hard_silu`) is a named call;
   the TFLite converter fuses it into HARD_SWISH, which XNNPACK runs in float but not at int8
   (one delegate partition per op on the slow builtin kernel: int8 was SLOWER than fp32). At
   int8 it becomes `x * relu6(x + 3)` (ADD with fused RELU6, MUL) times a lazy 1/6 (below).

2. Lazy constant scales (`_Scaled`). A multiplication or division by a constant is not
   emitted; the factor travels with the value through linear ops (reshape, pad, sums, products,
   adding constants) until a convolution or Dense with constant weights absorbs it into the
   weights. This removes the input's x/255 and /std passes, the 1/(H*W) of every mean and the
   1/6 of every hard-sigmoid and int8 hard-swish. Where a factor cannot be absorbed it is
   applied as an ordinary multiply.

3. Wide channel broadcasts (`widen_channel_broadcast`). A per-channel constant on a 3-channel
   image (the remaining `x - mean`) is slow in LiteRT because the broadcast's inner dimension
   is 3; it is applied on the `(B, H, W*3)` view with the constant tiled instead.

    fn = for_precision(fn, 'int8')     # same signature, same outputs
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

_CALL_PRIMITIVES = ('jit', 'pjit')


@dataclasses.dataclass(frozen=True)
class _Scaled:
  """A traced value whose true value is `value * scale` (scale: scalar or per last axis)."""

  value: Any
  scale: Any  # float or np.ndarray of shape (C,)

  @property
  def vector(self) -> bool:
    return np.ndim(self.scale) > 0


def _materialize(v: Any) -> Any:
  if not isinstance(v, _Scaled):
    return v
  if not v.vector:
    return v.value * np.asarray(v.scale, v.value.dtype)
  return _broadcast_op(jnp.multiply, v.value, np.asarray(v.scale, v.value.dtype))


def hard_swish_int8(x: jax.Array) -> _Scaled:
  """hard_swish(x) = x * relu6(x + 3) / 6, with the 1/6 left to the next weights.

  Not written as `x * relu6(x + 3) / 6`, which the converter fuses back into HARD_SWISH.
  """
  return _Scaled(x * jnp.clip(x + 3.0, 0.0, 6.0), 1.0 / 6.0)


# Named call -> replacement, for full-int8 export.
INT8_CALLS: Mapping[str, Callable[..., Any]] = {
    'hard_silu': hard_swish_int8,
    'hard_swish': hard_swish_int8,
}
# In float the call is kept whole (not inlined), so the converter still fuses HARD_SWISH.
FLOAT_CALLS: Mapping[str, Callable[..., Any]] = {
    'hard_silu': jax.nn.hard_swish,
    'hard_swish': jax.nn.hard_swish,
}

_BINARY = {'add': jnp.add, 'sub': jnp.subtract, 'mul': jnp.multiply, 'div': jnp.divide,
           'max': jnp.maximum, 'min': jnp.minimum}


def _broadcast_op(op: Callable, x: jax.Array, vec: np.ndarray, const_first: bool = False):
  """`op(x, vec)` with `vec` (C,) along x's last axis; on the wide view when C is small."""
  shape = tuple(x.shape)
  args = lambda a, c: (c, a) if const_first else (a, c)  # noqa: E731
  if len(shape) == 4 and shape[-1] <= 4 and shape[1] * shape[2] >= 16:
    b, h, w, c = shape
    wide = np.tile(np.asarray(vec), w).reshape(1, 1, w * c).astype(vec.dtype)
    return jnp.reshape(op(*args(jnp.reshape(x, (b, h, w * c)), wide)), shape)
  return op(*args(x, vec))


def _last_axis_vector(const: Any, shape: tuple[int, ...]) -> np.ndarray | None:
  """`const` as a (C,) vector if, broadcast to `shape`, it varies along the last axis only."""
  const = np.asarray(const)
  try:
    full = np.broadcast_to(const, shape)
  except ValueError:
    return None
  vec = full[(0,) * (len(shape) - 1)] if shape else full
  if not np.array_equal(full, np.broadcast_to(vec, shape)):
    return None
  return np.asarray(vec)


def widen_channel_broadcast(eqn, invals: Sequence) -> list | None:
  """`(B,H,W,C) op (C,)` with small C -> the same op on `(B,H,W*C)` with a tiled constant.

  Returns None (no rewrite) unless exactly one operand depends on the input and the other is
  a non-scalar constant varying along the last axis only.
  """
  if eqn.primitive.name not in _BINARY:
    return None
  shape = tuple(eqn.outvars[0].aval.shape)
  if len(shape) != 4 or shape[-1] > 4 or shape[1] * shape[2] < 16:
    return None
  traced = [i for i, v in enumerate(invals) if isinstance(v, jax.core.Tracer)]
  if len(traced) != 1 or tuple(invals[traced[0]].shape) != shape:
    return None
  t = traced[0]
  if np.size(invals[1 - t]) <= 1:
    return None  # a scalar broadcast is fast already
  vec = _last_axis_vector(invals[1 - t], shape)
  if vec is None:
    return None
  vec = vec.astype(np.asarray(invals[1 - t]).dtype)
  return [_broadcast_op(_BINARY[eqn.primitive.name], invals[t], vec, const_first=t == 1)]


def _is_traced(v: Any) -> bool:
  return isinstance(v, (jax.core.Tracer, _Scaled))


def _scalar(v: Any) -> float | None:
  if _is_traced(v) or np.size(v) != 1:
    return None
  return float(np.asarray(v).reshape(()))


def _absorb_conv(eqn, x: _Scaled, rhs: Any) -> list | None:
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


def _propagate(eqn, invals: Sequence) -> list | None:
  """Evaluates `eqn` keeping (or absorbing) lazy scales; None to fall back to materializing."""
  name = eqn.primitive.name
  params = eqn.params
  out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
  scaled = [i for i, v in enumerate(invals) if isinstance(v, _Scaled)]

  def bind(*args):
    with eqn.ctx.manager:
      return eqn.primitive.bind(*args, **params)

  if name == 'conv_general_dilated' and scaled == [0] and not _is_traced(invals[1]):
    return _absorb_conv(eqn, invals[0], invals[1])
  if name == 'dot_general' and len(scaled) == 1 and not _is_traced(invals[1 - scaled[0]]):
    x = invals[scaled[0]]
    if x.vector:
      return None
    const = np.asarray(invals[1 - scaled[0]])
    const = const * np.asarray(x.scale, const.dtype)
    args = (x.value, const) if scaled[0] == 0 else (const, x.value)
    return [bind(*args)]
  if len(scaled) != 1 and name not in ('mul', 'add', 'sub'):
    return None
  if name in ('reshape', 'broadcast_in_dim', 'squeeze', 'expand_dims', 'transpose', 'copy',
              'reduce_sum', 'slice', 'pad', 'convert_element_type') and scaled == [0]:
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
    return [_Scaled(bind(x.value, *invals[1:]), x.scale)]
  if name in ('mul', 'div'):
    a, b = invals
    if name == 'div' and isinstance(b, _Scaled):
      return None
    x, c = (a, b) if isinstance(a, _Scaled) else (b, a)
    if not _is_traced(c) and (name == 'mul' or x is a):
      # (x*s) * c = x * (s*c): a constant factor along the last axis joins the scale.
      vec = _last_axis_vector(c, out_shape)
      if vec is not None and np.all(vec != 0) and tuple(x.value.shape) == out_shape:
        factor = vec if name == 'mul' else 1.0 / vec
        if np.allclose(factor, factor.reshape(-1)[0], rtol=0, atol=0):
          factor = float(factor.reshape(-1)[0])
        scale = np.asarray(x.scale) * factor
        return [_Scaled(x.value, scale if np.ndim(scale) else float(scale))]
    sa = a.scale if isinstance(a, _Scaled) else 1.0
    sb = b.scale if isinstance(b, _Scaled) else 1.0
    if np.ndim(sa) and np.ndim(sb):
      return None
    va, vb = (x.value if isinstance(x, _Scaled) else x for x in (a, b))
    scale = np.asarray(sa) * np.asarray(sb) if (np.ndim(sa) or np.ndim(sb)) else sa * sb
    if np.ndim(scale) and out_shape[-1:] != np.shape(scale):
      return None
    return [_Scaled(bind(va, vb), scale)]
  if name in ('add', 'sub'):
    a, b = invals
    if isinstance(a, _Scaled) and isinstance(b, _Scaled):
      if np.shape(a.scale) != np.shape(b.scale) or not np.allclose(a.scale, b.scale, rtol=0):
        return None
      return [_Scaled(bind(a.value, b.value), a.scale)]
    x, c = (a, b) if isinstance(a, _Scaled) else (b, a)
    if _is_traced(c):
      if x.vector:
        return None
      # x*s + y = (x + y/s) * s: y/s is a multiply by a constant, which the converter fuses
      # into y's convolution (a residual branch); the scale stays lazy for the next weights.
      y = c * np.asarray(1.0 / x.scale, c.dtype)
      args = (x.value, y) if x is a else (y, x.value)
      return [_Scaled(bind(*args), x.scale)]
    # x*s + c = (x + c/s) * s, with c/s a constant.
    c = np.asarray(c)
    scale = np.asarray(x.scale, c.dtype if c.dtype.kind == 'f' else np.float32)
    shifted = (c / scale).astype(c.dtype) if c.dtype.kind == 'f' else None
    if shifted is None or (np.ndim(scale) and np.shape(np.broadcast_to(shifted, out_shape))
                           [-1:] != np.shape(scale)):
      return None
    if np.size(shifted) > 1 and x.value.ndim == 4 and x.value.shape[-1] <= 4:
      vec = _last_axis_vector(shifted, out_shape)
      if vec is not None:  # the wide-view trick for the image's per-channel offset
        return [_Scaled(_broadcast_op(_BINARY[name], x.value, vec.astype(c.dtype),
                                      const_first=x is b), x.scale)]
    args = (x.value, shifted) if x is a else (shifted, x.value)
    if name == 'sub' and x is b:  # c - x*s = (c/s - x) * s
      args = (shifted, x.value)
    return [_Scaled(bind(*args), x.scale)]
  return None


def _start_scale(eqn, invals: Sequence) -> list | None:
  """`x * c` or `x / c` with a scalar constant c -> a lazy scale instead of an op."""
  if eqn.primitive.name not in ('mul', 'div'):
    return None
  a, b = invals
  if isinstance(a, jax.core.Tracer) and _scalar(b) is not None:
    c = _scalar(b)
    if c == 0.0 or not jnp.issubdtype(a.dtype, jnp.floating):
      return None
    return [_Scaled(a, c if eqn.primitive.name == 'mul' else 1.0 / c)]
  if eqn.primitive.name == 'mul' and isinstance(b, jax.core.Tracer) and _scalar(a) is not None:
    if not jnp.issubdtype(b.dtype, jnp.floating):
      return None
    return [_Scaled(b, _scalar(a))]
  return None


def _eval_jaxpr(jaxpr, consts: Sequence, args: Sequence, calls: Mapping[str, Callable],
                eqn_rules: Sequence[Callable], lazy: bool) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts, strict=True):
    env[v] = c
  for v, a in zip(jaxpr.invars, args, strict=True):
    env[v] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    is_call = eqn.primitive.name in _CALL_PRIMITIVES
    name = eqn.params.get('name') if is_call else None
    constant = not any(_is_traced(v) for v in invals)
    outs = None
    if name in calls:
      outs = calls[name](*map(_materialize, invals))
      outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    elif is_call:  # inline, so the rules also apply inside nested calls
      closed = eqn.params['jaxpr']
      with jax.ensure_compile_time_eval() if constant else contextlib.nullcontext():
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, invals, calls, eqn_rules, lazy)
    elif not constant:
      if any(isinstance(v, _Scaled) for v in invals):
        outs = _propagate(eqn, invals)
        if outs is None:
          invals = [_materialize(v) for v in invals]
      elif lazy:
        outs = _start_scale(eqn, invals)
      if outs is None:
        for rule in eqn_rules:
          outs = rule(eqn, invals)
          if outs is not None:
            break
    if outs is None:
      params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = ()
      if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
      # Constant sub-expressions are evaluated now, so rules see constants as values.
      with eqn.ctx.manager, (jax.ensure_compile_time_eval() if constant
                             else contextlib.nullcontext()):
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs, strict=True):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def rewrite(fn: Callable[[jax.Array], jax.Array], calls: Mapping[str, Callable] = {},
            eqn_rules: Sequence[Callable] = (), lazy_scales: bool = False
            ) -> Callable[[jax.Array], jax.Array]:
  """`fn` (one array in, one array out) re-traced with rewrites applied.

  Args:
    fn: the function to export.
    calls: named call (e.g. 'hard_silu') -> replacement function (may return a lazily scaled
      value, see `hard_swish_int8`).
    eqn_rules: functions `(eqn, invals) -> outputs | None` tried on every equation that
      depends on the input, e.g. `widen_channel_broadcast`.
    lazy_scales: defer multiplications by constants into the next weights (rewrite 2).

  The replacement is traced anew for each input shape; `fn`'s closed-over constants (the
  model's weights) stay constants.
  """
  if not calls and not eqn_rules and not lazy_scales:
    return fn

  def rewritten(x):
    closed = jax.make_jaxpr(fn)(x)
    (out,) = _eval_jaxpr(closed.jaxpr, closed.consts, [x], calls, tuple(eqn_rules), lazy_scales)
    return _materialize(out)

  return rewritten


def for_precision(fn: Callable[[jax.Array], jax.Array],
                  precision: str) -> Callable[[jax.Array], jax.Array]:
  """The rewrites export applies at `precision` (all three at int8; 2 and 3 in float)."""
  calls = INT8_CALLS if precision == 'int8' else FLOAT_CALLS
  return rewrite(fn, calls=calls, eqn_rules=(widen_channel_broadcast,), lazy_scales=True)


def count_calls(fn: Callable, example: jax.ShapeDtypeStruct, names: Sequence[str]) -> int:
  """How many calls named in `names` tracing `fn` on `example` makes (nested ones included)."""
  def walk(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _CALL_PRIMITIVES and eqn.params.get('name') in names:
        n += 1
      for sub in jex.core.jaxprs_in_params(eqn.params):
        n += walk(sub)
    return n
  return walk(jax.make_jaxpr(fn)(example).jaxpr)
