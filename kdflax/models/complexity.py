"""Parameter and multiply-accumulate (MAC) counts of any Flax model, without running it.

Parameters are counted from `jax.eval_shape(module.init, ...)`, so even Swin-L is never
materialised. MACs are counted analytically from the traced jaxpr of one eval-mode forward
pass: every `dot_general` (Dense, attention matmuls, einsums) and every
`conv_general_dilated` contributes (output elements x contracted elements). Element-wise ops,
norms and softmax are not counted, which is the convention of the published figures
(fvcore/timm "GMACs").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from kdflax.models.depthwise import reference_form


def abstract_variables(module: nn.Module, image_size: int | tuple[int, int],
                       batch: int = 1) -> Mapping[str, Any]:
  """`ShapeDtypeStruct` tree of `module.init` for `(batch, H, W, 3)` inputs."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda xx: module.init(jax.random.key(0), xx), x)


def count_params(variables_or_params: Mapping[str, Any]) -> int:
  """Number of scalars in the `params` collection (or in a bare params tree)."""
  tree = variables_or_params.get('params', variables_or_params)
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def _dot_general_macs(eqn) -> int:
  lhs, _ = (v.aval for v in eqn.invars)
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return math.prod(out.shape) * contracted


def _conv_macs(eqn) -> int:
  _, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  # rhs_spec = (out_feature_dim, in_feature_dim, *spatial_dims)
  rhs_spec = dn.rhs_spec
  in_per_group = rhs.shape[rhs_spec[1]]
  kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  return math.prod(out.shape) * in_per_group * kernel_spatial


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_general_macs(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_macs(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * _jaxpr_macs(eqn.params['jaxpr'].jaxpr)
    elif name == 'cond':
      total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params['branches'])
    else:
      for sub in jex.core.jaxprs_in_params(eqn.params):
        total += _jaxpr_macs(sub)
  return total


def count_macs(module: nn.Module, variables: Mapping[str, Any],
               image_size: int | tuple[int, int], batch: int = 1) -> int:
  """MACs of one eval-mode forward pass of `batch` images (`variables` may be abstract)."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
  module = reference_form(module)  # depthwise as convolutions, counted by `_conv_macs`
  closed = jax.make_jaxpr(lambda v, xx: module.apply(v, xx))(variables, x)
  return int(_jaxpr_macs(closed.jaxpr))


def model_complexity(module: nn.Module, image_size: int | tuple[int, int]) -> dict[str, float]:
  """`{'params': int, 'gmacs': float}` at batch 1, computed abstractly (nothing allocated)."""
  variables = abstract_variables(module, image_size)
  return {
      'params': count_params(variables),
      'gmacs': count_macs(module, variables, image_size) / 1e9,
  }


def tree_size_mb(tree: Any) -> float:
  """Bytes of all array leaves of `tree`, in MB (1e6)."""
  return sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)) / 1e6
