"""The function `export_tflite` exports, and its JAX outputs for the parity check.

    fn = serving_function(module, variables, 'uint8', 'probabilities')
    int8_blockers(fn, example)            # [] or e.g. ['erf (exact GELU)']: no int8 file
    jax_logits(fn, images, batch=1)       # (N, S, S, 3) uint8 -> (N, K) float32, the reference
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from kdflax.export.model_metadata import OUTPUTS
from kdflax.models.depthwise import reference_form

INPUT_TYPES = ('uint8', 'float32')
# JAX primitives the TFLite converter turns into float-only polynomials: at int8 they convert,
# then the interpreter aborts the process (docs/export.md), so they are refused up front.
INT8_BLOCKERS = {
    'erf': 'erf (exact GELU)',
    'erfc': 'erfc (exact GELU)',
    'erf_inv': 'erf_inv',
    'lgamma': 'lgamma',
    'digamma': 'digamma',
}


def serving_function(module: nn.Module, variables: Mapping[str, Any],
                     input_type: str = 'uint8', output: str = 'logits'
                     ) -> Callable[[jax.Array], jax.Array]:
  """The function that gets exported: raw image batch -> logits or probabilities.

  `input_type='uint8'`: `(B, S, S, 3)` uint8 0..255; `'float32'`: float 0..1. Returns
  `(B, K)` float32 of `module` in eval mode with `variables` baked in as constants: the
  logits (`output='logits'`, the default here) or their softmax (`'probabilities'`, what
  `export_tflite` exports by default).
  """
  if input_type not in INPUT_TYPES:
    raise ValueError(f'input_type must be one of {INPUT_TYPES}, got {input_type!r}')
  if output not in OUTPUTS:
    raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
  variables = jax.tree.map(jnp.asarray, dict(variables))
  module = reference_form(module)  # grouped convolutions -> TFLite DEPTHWISE_CONV_2D

  def fn(image):
    x = image.astype(jnp.float32)
    if input_type == 'uint8':
      x = x * (1.0 / 255.0)
    logits = module.apply(variables, x, train=False).astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if output == 'probabilities' else logits

  return fn


def _primitives(jaxpr) -> Iterator[str]:
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _primitives(sub)


def int8_blockers(fn: Callable, example: jax.ShapeDtypeStruct) -> list[str]:
  """Names of the ops in `fn` that a full-int8 TFLite graph cannot run (see `INT8_BLOCKERS`)."""
  closed = jax.make_jaxpr(fn)(example)
  return sorted({INT8_BLOCKERS[p] for p in _primitives(closed.jaxpr) if p in INT8_BLOCKERS})


def input_array(images: np.ndarray, input_type: str) -> np.ndarray:
  """`(N, S, S, 3)` uint8 RGB 0..255 as the exported input takes them (uint8, or float 0..1)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 RGB 0..255, got {images.dtype}')
  return images if input_type == 'uint8' else images.astype(np.float32) / 255.0


def batched(images: np.ndarray, batch: int) -> Iterator[np.ndarray]:
  """Chunks of exactly `batch` images (the last one padded by repeating its last image)."""
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    if len(chunk) < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
    yield chunk


def jax_logits(fn: Callable, images: np.ndarray, batch: int = 1,
               input_type: str = 'uint8') -> np.ndarray:
  """`(N, S, S, 3)` uint8 -> `(N, K)` outputs of the serving function (logits or
  probabilities, whichever it returns), in `batch`-sized calls."""
  x = input_array(images, input_type)
  jitted = jax.jit(fn)
  out = [np.asarray(jitted(chunk)) for chunk in batched(x, batch)]
  return np.concatenate(out)[:len(images)]
