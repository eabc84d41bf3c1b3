"""Layers shared by the ViT and Swin transformers, initialised as timm initialises them.

    y = Mlp(hidden_dim=4 * c, name='mlp')(x, train)         # (B, T, C) -> (B, T, C)
    head = dense(num_classes, 'head', dtype, param_dtype)    # timm's nn.Linear, named 'head'

`DtypeModule` is the base of their modules: the compute / parameter dtypes as keyword-only
fields. Parameter names are timm's (`fc1`, `fc2`), so the checkpoint converters map both
families the same way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
# timm's `trunc_normal_(std=.02)` for Linear weights (and ViT's position / distillation tokens).
TRUNC_NORMAL_02 = nn.initializers.truncated_normal(stddev=0.02)


def dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True) -> nn.Dense:
  """An `nn.Dense` with timm's init: truncated-normal (std 0.02) kernel, zero bias."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=TRUNC_NORMAL_02, dtype=dtype,
                  param_dtype=param_dtype, name=name)


class DtypeModule(nn.Module, kw_only=True):
  """Base of the ViT / Swin transformer modules: their compute and parameter dtypes.

  The fields are keyword-only, so a subclass's constructor takes its own fields first
  (positionally or by name) and these by name only.

  Attributes:
    dtype: compute dtype (e.g. `jnp.bfloat16`).
    param_dtype: parameter dtype.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class Mlp(DtypeModule):
  """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout: `(B, T, C)` -> `(B, T, C)`.

  Attributes:
    hidden_dim: width of fc1's output.
    drop_rate: dropout after the GELU and after fc2 (timm's `proj_drop`; 0 for ViT).
  """

  hidden_dim: int
  drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out_dim = x.shape[-1]
    x = dense(self.hidden_dim, 'fc1', self.dtype, self.param_dtype)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.drop_rate, name='drop1')(x, deterministic=not train)
    x = dense(out_dim, 'fc2', self.dtype, self.param_dtype)(x)
    return nn.Dropout(self.drop_rate, name='drop2')(x, deterministic=not train)
