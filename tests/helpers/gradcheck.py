"""Central finite differences, the reference for gradient tests (use float64 inputs)."""

import jax
import numpy as np


def finite_difference_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """`d f / d x` of scalar `f` at every coordinate of `x`, by central differences."""
  f = jax.jit(f)
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[i] = eps
    grad[i] = (float(f(x + step)) - float(f(x - step))) / (2 * eps)
  return grad
