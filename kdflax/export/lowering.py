"""Export-time rewrites: the same function, expressed with ops LiteRT runs fast.

The serving function is traced to a jaxpr and re-evaluated with three rewrites (each exact in
real arithmetic; float results differ by rounding only). Measured with ai-edge-litert 2.3.0 /
XNNPACK on MobileNetV3-Large at 224 px, batch 1, 1 thread (see docs/export.md):

1. int8 hard-swish (`INT8_CALLS`). `jax.nn.hard_swish` (alias `hard_silu`) is a named call;
   the TFLite converter fuses it into HARD_SWISH, which XNNPACK runs in float but not at int8
   (one delegate partition per op on the slow builtin kernel: int8 was SLOWER than fp32). At
   int8 it becomes `x * relu6(x + 3)` (ADD with fused RELU6, MUL) times a lazy 1/6 (below).

2. Lazy constant scales (`lazy_scales.py`). A multiplication or division by a constant is not
   emitted; the factor travels with the value until the weights of a convolution or Dense
   absorb it: the input's x/255 and /std, the 1/(H*W) of every mean, the 1/6 of every
   hard-sigmoid and int8 hard-swish.

3. Wide channel broadcasts (`channel_broadcast.py`). A per-channel constant on a 3-channel
   image (the remaining `x - mean`) is applied on the `(B, H, W*3)` view with the constant
   tiled, as LiteRT is slow when the broadcast's inner dimension is 3.

    fn = for_precision(fn, 'int8')     # same signature, same outputs
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp

from kdflax.export.channel_broadcast import widen_channel_broadcast
from kdflax.export.lazy_scales import Scaled, is_traced, materialize, propagate, start_scale

_CALL_PRIMITIVES = ('jit', 'pjit')


def hard_swish_int8(x: jax.Array) -> Scaled:
  """hard_swish(x) = x * relu6(x + 3) / 6, with the 1/6 left to the next weights.

  Not written as `x * relu6(x + 3) / 6`, which the converter fuses back into HARD_SWISH.
  """
  return Scaled(x * jnp.clip(x + 3.0, 0.0, 6.0), 1.0 / 6.0)


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
    constant = not any(is_traced(v) for v in invals)
    outs = None
    if name in calls:
      outs = calls[name](*map(materialize, invals))
      outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    elif is_call:  # inline, so the rules also apply inside nested calls
      closed = eqn.params['jaxpr']
      with jax.ensure_compile_time_eval() if constant else contextlib.nullcontext():
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, invals, calls, eqn_rules, lazy)
    elif not constant:
      if any(isinstance(v, Scaled) for v in invals):
        outs = propagate(eqn, invals)
        if outs is None:
          invals = [materialize(v) for v in invals]
      elif lazy:
        outs = start_scale(eqn, invals)
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
    return materialize(out)

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
