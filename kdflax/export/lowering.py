"""Export-time rewrites of named JAX calls, so each precision gets the ops its runtime is fast at.

`jax.nn.hard_swish` (an alias of `hard_silu`) is a named `jit` call in a traced function. The
TFLite converter fuses it into one HARD_SWISH op: ideal in float, where the LiteRT XNNPACK
delegate runs it, but at int8 XNNPACK does not take HARD_SWISH (measured with ai-edge-litert
2.3.0: one delegate partition per HARD_SWISH, the op itself on the slow reference kernel), and
MobileNetV3 has 21 of them. For int8 the call is re-expressed as

    hard_swish(x) = (x * 1/6) * relu6(x + 3)

which the converter keeps as MUL, ADD (fused RELU6) and MUL, all on XNNPACK's quantized path.
Numerically it is the same function (both are exact in real arithmetic; float results differ
by rounding only).

    fn = rewrite_calls(fn, INT8_RULES)     # same signature, same outputs
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp

_CALL_PRIMITIVES = ('jit', 'pjit')


def hard_swish_int8(x: jax.Array) -> jax.Array:
  """x * relu6(x + 3) / 6, arranged so TFLite does not fuse it into HARD_SWISH."""
  return (x * (1.0 / 6.0)) * jnp.clip(x + 3.0, 0.0, 6.0)


# Named call -> replacement, for full-int8 export.
INT8_RULES: Mapping[str, Callable[..., jax.Array]] = {
    'hard_silu': hard_swish_int8,
    'hard_swish': hard_swish_int8,
}


def _eval_jaxpr(jaxpr, consts: Sequence, args: Sequence,
                rules: Mapping[str, Callable]) -> list:
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
    if name in rules:
      outs = rules[name](*invals)
      outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    elif is_call:  # inline, so rules also apply inside nested calls
      closed = eqn.params['jaxpr']
      outs = _eval_jaxpr(closed.jaxpr, closed.consts, invals, rules)
    else:
      params = eqn.primitive.get_bind_params(eqn.params)
      subfuns = ()
      if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, o in zip(eqn.outvars, outs, strict=True):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def rewrite_calls(fn: Callable[[jax.Array], jax.Array],
                  rules: Mapping[str, Callable]) -> Callable[[jax.Array], jax.Array]:
  """`fn` (one array in, one array out) with every named call in `rules` replaced.

  The replacement is traced anew for each input shape; `fn`'s closed-over constants (the
  model's weights) stay constants.
  """
  if not rules:
    return fn

  def rewritten(x):
    closed = jax.make_jaxpr(fn)(x)
    (out,) = _eval_jaxpr(closed.jaxpr, closed.consts, [x], rules)
    return out

  return rewritten


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
