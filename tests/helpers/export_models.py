"""Small models and real photos for the export tests.

`TinyCNN` has every op family MobileNetV3 exports (stride-2 conv with symmetric padding,
BatchNorm, hard-swish, SE-style 1x1 convs on a pooled map with hard-sigmoid gating, global
mean, Dense on 2-D); `TinyGelu` has exact (erf) GELU, which full-int8 TFLite cannot run.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
BEANS = ROOT / 'data' / 'beans_sample'
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TinyCNN(nn.Module):
  """`(B, S, S, 3)` in [0, 1] -> `(B, num_classes)` logits."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = (x - jnp.asarray(MEAN)) / jnp.asarray(STD)
    x = nn.Conv(16, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = jax.nn.hard_swish(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=16,
                use_bias=False)(x)
    x = jax.nn.hard_swish(nn.BatchNorm(use_running_average=not train)(x))
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Conv(8, (1, 1))(s))
    x = x * jax.nn.hard_sigmoid(nn.Conv(16, (1, 1))(s))
    x = nn.Conv(24, (1, 1), use_bias=False)(x)
    x = jnp.mean(nn.BatchNorm(use_running_average=not train)(x), axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TinyGelu(nn.Module):
  """Patch embedding + LayerNorm + exact-GELU MLP + mean pool + head."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (4, 4), strides=4)(x)
    x = nn.LayerNorm(epsilon=1e-5)(x)
    x = nn.gelu(nn.Dense(32)(x), approximate=False)
    x = jnp.mean(nn.Dense(16)(x), axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def leaf_files(split: str = 'val', per_class: int = 4) -> list[pathlib.Path]:
  """The first `per_class` photos of each class of the bundled bean-leaf sample."""
  files = []
  for class_dir in sorted((BEANS / split).iterdir()):
    files += sorted(class_dir.glob('*.jpg'))[:per_class]
  return files


def leaf_images(size: int, split: str = 'val', per_class: int = 4) -> np.ndarray:
  """`(3 * per_class, size, size, 3)` uint8 real photos."""
  from kdflax.export.images import load_images
  return load_images(leaf_files(split, per_class), size)


def init_calibrated(module: nn.Module, size: int, images: np.ndarray, seed: int = 0) -> dict:
  """Random weights with BatchNorm statistics of `images` (so activations are O(1))."""
  from kdflax.export.stand_in import calibrate_batch_stats
  from kdflax.models.init import init_variables
  variables = init_variables(module, seed, size)
  return calibrate_batch_stats(module, variables, images)


def train_briefly(module: nn.Module, images: np.ndarray, labels: np.ndarray, steps: int = 60,
                  seed: int = 0) -> dict:
  """Fits `module` to `(N, S, S, 3)` uint8 `images` with the kdflax train step (CE, Adam).

  A trained student has the class margins that int8 parity needs; random weights do not
  (their arg-max is decided by rounding). 60 steps over-fit a few dozen photos.
  """
  import optax

  from kdflax.distill.objective import Objective, default_loss_config
  from kdflax.models.init import init_variables
  from kdflax.train.state import create_train_state
  from kdflax.train.step import data_mesh, make_train_step, replicate

  mesh = data_mesh()
  variables = init_variables(module, seed, images.shape[1])
  state = replicate(create_train_state(variables, {}, optax.adam(2e-3), seed=seed), mesh)
  step = make_train_step(module, None, Objective(default_loss_config(), None, None).apply, mesh)
  batch = {'image': images.astype(np.float32) / 255, 'label': labels.astype(np.int32)}
  for _ in range(steps):
    state, metrics = step(state, None, batch)
  assert float(metrics['top1']) == 1.0, 'the student did not fit its photos'
  return jax.device_get(state.student_variables)
