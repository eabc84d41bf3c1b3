"""Rewrite 3, wide channel broadcasts: `(B, H, W, C) op (C,)` with small C on a wide view.

A per-channel constant on a 3-channel image (e.g. the remaining `x - mean`) is slow in LiteRT
because the broadcast's inner dimension is 3; it is applied on the `(B, H, W*C)` view with the
constant tiled instead (`docs/export.md`). `lowering.rewrite` tries `widen_channel_broadcast`
on every equation that depends on the input; `lazy_scales.py` uses the same wide view for the
per-channel offset it folds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The elementwise binary primitives a per-channel constant can be widened for.
BINARY = {'add': jnp.add, 'sub': jnp.subtract, 'mul': jnp.multiply, 'div': jnp.divide,
          'max': jnp.maximum, 'min': jnp.minimum}


def broadcast_op(op: Callable, x: jax.Array, vec: np.ndarray, const_first: bool = False):
  """`op(x, vec)` with `vec` (C,) along x's last axis; on the wide view when C is small."""
  shape = tuple(x.shape)
  args = lambda a, c: (c, a) if const_first else (a, c)  # noqa: E731
  if len(shape) == 4 and shape[-1] <= 4 and shape[1] * shape[2] >= 16:
    b, h, w, c = shape
    wide = np.tile(np.asarray(vec), w).reshape(1, 1, w * c).astype(vec.dtype)
    return jnp.reshape(op(*args(jnp.reshape(x, (b, h, w * c)), wide)), shape)
  return op(*args(x, vec))


def last_axis_vector(const: Any, shape: tuple[int, ...]) -> np.ndarray | None:
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
  if eqn.primitive.name not in BINARY:
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
  vec = last_axis_vector(invals[1 - t], shape)
  if vec is None:
    return None
  vec = vec.astype(np.asarray(invals[1 - t]).dtype)
  return [broadcast_op(BINARY[eqn.primitive.name], invals[t], vec, const_first=t == 1)]
