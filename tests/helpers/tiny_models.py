"""Small Flax models with the kdflax model contract, for fast train-step tests."""

import flax.linen as nn
import jax.numpy as jnp


class TinyCNN(nn.Module):
  """conv-BN-relu x2 + dropout + head; sows `stage0`, `stage1` like the real families."""

  num_classes: int = 5
  width: int = 8
  drop_rate: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = (x - 0.5) / 0.25
    for i in range(2):
      x = nn.Conv(self.width * (i + 1), (3, 3), strides=2, padding=1, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      self.sow('intermediates', f'stage{i}', x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x).astype(jnp.float32)


class TinyTeacher(nn.Module):
  """A BN-free teacher with a different width, sowing `stage0`, `stage1`."""

  num_classes: int = 5

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(2):
      x = nn.gelu(nn.Conv(12 * (i + 1), (3, 3), strides=2, padding=1)(x), approximate=False)
      self.sow('intermediates', f'stage{i}', x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))
