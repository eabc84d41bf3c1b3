"""Stand-in weights: random weights that behave like trained ones, for export checks and benchmarks.

Two problems make freshly initialised weights useless for checking or timing an export, and
each has a cheap fix:

1. Activation statistics (`calibrate_batch_stats`). Flax initialises BatchNorm running statistics to mean 0 / variance 1, which do not match the
activations of a random network: in a deep net (MobileNetV3-Large) activations then shrink
layer after layer to ~1e-5. Such a model is useless for export checks and benchmarks (parity
tolerances become vacuous, int8 scales collapse and the LiteRT XNNPACK delegate refuses some
ops), so tests and benchmarks that use untrained weights first set every running mean/var to
the batch statistics of real images, as training would:

    variables = calibrate_batch_stats(module, variables, images)   # (N, S, S, 3) uint8

   In train mode BatchNorm normalises with the batch's own statistics, so every layer's batch
statistics come out of one forward pass regardless of the running values; the update rule
   `new = m * old + (1 - m) * batch` is inverted with two passes, which also yields `m`.

2. Class margins (`fit_head`). A random classifier's logits hardly vary between images (spread
   ~0.2 for MobileNetV3-Large), so int8 rounding alone decides its arg-max (measured: 40-65%
   top-1 agreement with JAX), whereas a trained model's margins dwarf that noise. Refitting
   only the last Dense layer on real labelled images (ridge regression of one-hot targets on
   its input features, a linear probe) gives the model real margins:

    variables = fit_head(module, variables, images, labels)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def calibrate_batch_stats(module: nn.Module, variables: Mapping[str, Any],
                          images: np.ndarray) -> dict[str, Any]:
  """Returns `variables` with `batch_stats` replaced by the statistics of `images`.

  Args:
    module: a model whose `apply(variables, x, train=True, mutable=['batch_stats'])` updates
      its BatchNorm running statistics.
    variables: `{'params': ..., 'batch_stats': ...}`; returned unchanged without batch_stats.
    images: `(N, S, S, 3)` uint8 0..255 or float 0..1; N >= 2.
  """
  variables = dict(variables)
  if 'batch_stats' not in variables:
    return variables
  x = np.asarray(images)
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  if len(x) < 2:
    raise ValueError('calibrate_batch_stats needs at least 2 images')

  @jax.jit
  def update(stats):
    _, state = module.apply({**variables, 'batch_stats': stats}, jnp.asarray(x), train=True,
                            mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
    return state['batch_stats']

  zeros = jax.tree.map(jnp.zeros_like, variables['batch_stats'])
  first = update(zeros)    # (1 - m) * batch
  second = update(first)   # (1 - m) * (1 + m) * batch

  def solve(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    big = np.abs(a) > 1e-12
    m = float(np.median(b[big] / a[big]) - 1.0) if big.any() else 0.0
    return (a / (1.0 - m)).astype(np.float32)

  variables['batch_stats'] = jax.tree.map(solve, first, second)
  return variables


def head_features(module: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
                  head: str = 'classifier') -> np.ndarray:
  """`(N, F)` inputs of the Dense layer named `head` for `(N, S, S, 3)` uint8 images."""
  x = jnp.asarray(np.asarray(images, np.float32) / 255.0)
  seen = {}

  def grab(next_fun, args, kwargs, context):
    if context.module.name == head and context.method_name == '__call__':
      seen['features'] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    module.apply(variables, x, train=False)
  if 'features' not in seen:
    raise ValueError(f'{type(module).__name__} has no submodule named {head!r}')
  return np.asarray(seen['features'], np.float64).reshape(len(images), -1)


def fit_head(module: nn.Module, variables: Mapping[str, Any], images: np.ndarray,
             labels: np.ndarray, head: str = 'classifier', margin: float = 4.0,
             ridge: float = 1e-2) -> dict[str, Any]:
  """Returns `variables` with Dense `head` refit so `images` get logits `margin * one_hot`.

  Args:
    images: `(N, S, S, 3)` uint8 photos; labels: `(N,)` class indices below the head size.
    margin: target logit of the true class (others 0), before centring.
    ridge: L2 penalty, relative to the mean feature energy.
  """
  f = head_features(module, variables, images, head)
  params = variables['params'][head]
  k = params['kernel'].shape[-1]
  labels = np.asarray(labels)
  if labels.min() < 0 or labels.max() >= k:
    raise ValueError(f'labels must be in [0, {k}), got {labels.min()}..{labels.max()}')
  target = margin * (np.eye(k)[labels] - 1.0 / k)
  mu = f.mean(0)
  fc = f - mu
  gram = fc.T @ fc if fc.shape[0] >= fc.shape[1] else None
  lam = ridge * float(np.mean(np.sum(fc ** 2, axis=1)))
  if gram is not None:
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), fc.T @ target)
  else:  # fewer images than features: the dual form
    w = fc.T @ np.linalg.solve(fc @ fc.T + lam * np.eye(len(fc)), target)
  b = target.mean(0) - mu @ w
  new_params = dict(variables['params'])
  new_params[head] = {**params, 'kernel': jnp.asarray(w, params['kernel'].dtype),
                      'bias': jnp.asarray(b, params['bias'].dtype)}
  return {**variables, 'params': new_params}
