"""Input normalisation every model applies to its `(B, H, W, 3)` [0, 1] images.

Models own their normalisation so that the pipeline, the trainer and the exported `.tflite`
all feed the same input. The expression is kept as `(x - mean) / std` in float32: the TFLite
export folds the division into the first convolution's weights (`kdflax/export/lowering.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, dtype: Any = jnp.float32,
              mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """`((images - mean) / std)` computed in float32, returned in the model's compute `dtype`."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return ((jnp.asarray(images).astype(jnp.float32) - mean) / std).astype(dtype)
