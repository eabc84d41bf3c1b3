"""MAC and parameter counting against hand-derived counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdflax.models import complexity


class _Net(nn.Module):
  """conv 3x3/s2 -> depthwise 3x3 -> scan'd dense -> attention-like einsum -> dense head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), strides=2, padding=1)(x)                          # 16x16x8
    x = nn.Conv(8, (3, 3), padding=1, feature_group_count=8, use_bias=False)(x)
    tokens = x.reshape(x.shape[0], -1, 8)                                     # (B, 256, 8)
    attn = jnp.einsum('bnc,bmc->bnm', tokens, tokens)                         # 256*256*8
    tokens = jnp.einsum('bnm,bmc->bnc', jax.nn.softmax(attn), tokens)         # 256*256*8

    def body(carry, _):
      return nn.Dense(8)(carry), None
    tokens, _ = nn.scan(lambda mdl, c, xs: body(c, xs), variable_broadcast='params',
                        split_rngs={'params': False}, length=3)(self, tokens, None)
    return nn.Dense(5)(tokens.mean(axis=1))


def test_macs_match_hand_count():
  module = _Net()
  variables = complexity.abstract_variables(module, 32, batch=2)
  macs = complexity.count_macs(module, variables, 32, batch=2)
  per_image = (16 * 16 * 8 * 3 * 3 * 3          # stem conv
               + 16 * 16 * 8 * 3 * 3            # depthwise: one input channel per group
               + 2 * 256 * 256 * 8              # two attention matmuls
               + 3 * 256 * 8 * 8                # dense applied 3 times inside the scan
               + 8 * 5)                         # head
  assert macs == 2 * per_image


def test_params_count_from_abstract_init():
  module = nn.Sequential([nn.Conv(4, (3, 3)), nn.Dense(7)])
  abstract = complexity.abstract_variables(module, 8)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert complexity.count_params(abstract) == (3 * 3 * 3 * 4 + 4) + (4 * 7 + 7)
  real = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert complexity.count_params(real) == complexity.count_params(abstract)
  assert complexity.tree_size_mb(real) == pytest.approx(
      4 * sum(np.size(x) for x in jax.tree.leaves(real)) / 1e6)
