"""MobileNetV3 Large / Small, numerically the same network as timm's `mobilenetv3_*`.

    module = MobileNetV3(num_classes=10, variant='large', width_mult=1.0)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    logits = module.apply(variables, images)                   # (B, 10) float32
    logits, state = module.apply(variables, images, mutable=['intermediates'])
    state['intermediates']['stage3']                           # ((B, 7, 7, 960),)

Layout and names follow timm 1.0.31 (`timm/models/mobilenetv3.py::_gen_mobilenet_v3` and
`_efficientnet_blocks.py`), so that a timm state dict maps key by key (`blocks.2.1.conv_dw` ->
`blocks_2_1/conv_dw`):

  conv_stem 3x3/2 -> bn1 + hard-swish -> blocks_{stage}_{block} -> global average pool ->
  conv_head 1x1 (bias, no BN) + hard-swish -> dropout -> classifier (Dense).

Blocks: `ds` depthwise-separable (dw -> SE -> pw, no activation after pw), `ir` inverted
residual (pw expand -> dw -> SE -> pw linear), `cn` 1x1 conv + BN + activation. SE reduces to
`make_divisible(mid / 4)` channels with ReLU, gates with hard-sigmoid, all 1x1 convolutions.
Convolutions pad symmetrically by k // 2 (PyTorch style; Flax 'SAME' pads asymmetrically at
stride 2). Channels are `make_divisible(c * width_mult)`; the stem stays 16 wide when
`width_mult < 0.75` (timm `fix_stem`); the head width (1280 / 1024) is never scaled.

Export-clean: every op on a rank-4 tensor is a convolution, element-wise op or mean, and the
classifier Dense sees a 2-D `(B, C)` tensor, so jax2tf -> TFLite yields builtin ops only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdflax.models import quant
from kdflax.models.depthwise import DepthwiseConv, check_impl
from kdflax.models.preprocess import normalize

# PyTorch BatchNorm defaults (momentum 0.1 -> Flax decay 0.9, eps 1e-5), as timm uses them.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# timm's arch_def, one tuple of block groups per stage:
# (kind, repeats, kernel, stride of the first block, expansion, out channels, SE, activation).
_RE, _HS = 'relu', 'hard_swish'
_ARCH: dict[str, tuple[tuple[tuple[Any, ...], ...], ...]] = {
    'large': (
        (('ds', 1, 3, 1, 1.0, 16, False, _RE),),
        (('ir', 1, 3, 2, 4.0, 24, False, _RE), ('ir', 1, 3, 1, 3.0, 24, False, _RE)),
        (('ir', 3, 5, 2, 3.0, 40, True, _RE),),
        (('ir', 1, 3, 2, 6.0, 80, False, _HS), ('ir', 1, 3, 1, 2.5, 80, False, _HS),
         ('ir', 2, 3, 1, 2.3, 80, False, _HS)),
        (('ir', 2, 3, 1, 6.0, 112, True, _HS),),
        (('ir', 3, 5, 2, 6.0, 160, True, _HS),),
        (('cn', 1, 1, 1, 1.0, 960, False, _HS),),
    ),
    'small': (
        (('ds', 1, 3, 2, 1.0, 16, True, _RE),),
        (('ir', 1, 3, 2, 4.5, 24, False, _RE), ('ir', 1, 3, 1, 3.67, 24, False, _RE)),
        (('ir', 1, 5, 2, 4.0, 40, True, _HS), ('ir', 2, 5, 1, 6.0, 40, True, _HS)),
        (('ir', 2, 5, 1, 3.0, 48, True, _HS),),
        (('ir', 3, 5, 2, 6.0, 96, True, _HS),),
        (('cn', 1, 1, 1, 1.0, 576, False, _HS),),
    ),
}
# Stages whose outputs are the stride 4, 8, 16, 32 feature maps (timm `feature_info`).
FEATURE_STAGES = {'large': (1, 2, 4, 6), 'small': (0, 1, 3, 5)}
HEAD_FEATURES = {'large': 1280, 'small': 1024}
STEM_FEATURES = 16

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu, 'relu6': jax.nn.relu6, 'hard_swish': jax.nn.hard_swish}


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of `divisor`, never below 90% of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < round_limit * value:
    rounded += divisor
  return rounded


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One resolved block: channel counts after width scaling and rounding.

  Attributes:
    kind: 'ds' (depthwise-separable), 'ir' (inverted residual) or 'cn' (conv-BN-act).
    in_chs, mid_chs, out_chs: input, expanded (depthwise) and output channels.
    se_chs: SE bottleneck width, 0 without SE.
    kernel, stride: of the depthwise conv ('ds'/'ir') or of the conv ('cn').
    act: 'relu', 'relu6' (EfficientNet-Lite) or 'hard_swish'.
    has_skip: residual connection (stride 1, in == out, not 'cn').
    drop_path: stochastic-depth rate of this block relative to `drop_path_rate`
      (timm: block index / number of blocks).
  """

  kind: str
  in_chs: int
  mid_chs: int
  out_chs: int
  se_chs: int
  kernel: int
  stride: int
  act: str
  has_skip: bool
  drop_path: float


def stem_features(width_mult: float) -> int:
  """Stem width: 16, scaled only when `width_mult >= 0.75` (timm `fix_stem`)."""
  return STEM_FEATURES if width_mult < 0.75 else make_divisible(STEM_FEATURES * width_mult)


def block_configs(variant: str, width_mult: float) -> tuple[tuple[BlockConfig, ...], ...]:
  """Resolves timm's arch definition into per-stage tuples of `BlockConfig`."""
  if variant not in _ARCH:
    raise ValueError(f"MobileNetV3 variant must be 'large' or 'small', got {variant!r}")
  if width_mult <= 0:
    raise ValueError(f'MobileNetV3 width_mult must be positive, got {width_mult!r}')
  arch = _ARCH[variant]
  total = sum(group[1] for stage in arch for group in stage)
  in_chs = stem_features(width_mult)
  index = 0
  stages = []
  for stage in arch:
    blocks = []
    for kind, repeats, kernel, stride, expansion, out, se, act in stage:
      out_chs = make_divisible(out * width_mult)
      for r in range(repeats):
        s = stride if r == 0 else 1
        mid_chs = in_chs if kind != 'ir' else make_divisible(in_chs * expansion)
        blocks.append(BlockConfig(
            kind=kind, in_chs=in_chs, mid_chs=mid_chs, out_chs=out_chs,
            se_chs=make_divisible(mid_chs * 0.25) if se else 0, kernel=kernel, stride=s,
            act=act, has_skip=kind != 'cn' and s == 1 and in_chs == out_chs,
            drop_path=index / total))
        in_chs = out_chs
        index += 1
    stages.append(tuple(blocks))
  return tuple(stages)


class _Layers:
  """Conv / BN / activation factories sharing dtype and quantisation settings.

  Used inside `nn.compact` methods. With `quantize`, kernels are rounded to int8 per output
  channel and activations pass through `quant.ActRange` where the int8 `.tflite` holds an int8
  tensor (after each convolution, activation, SE product and residual sum); without it every
  method is the float op.
  """

  def __init__(self, dtype: Any, param_dtype: Any, train: bool, quantize: bool = False):
    self.dtype, self.param_dtype, self.train = dtype, param_dtype, train
    self.quantize = quantize

  def conv(self, features: int, kernel: int, stride: int = 1, bias: bool = False,
           name: str | None = None) -> nn.Conv:
    pad = kernel // 2
    extra = {'conv_general_dilated': quant.quantized_conv_general_dilated} if self.quantize else {}
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name, **extra)

  def q(self, x: jax.Array, name: str) -> jax.Array:
    """int8 fake quantisation of an activation tensor (identity in the float model)."""
    return quant.ActRange(name=name)(x, update=self.train) if self.quantize else x

  def act(self, x: jax.Array, kind: str, name: str) -> jax.Array:
    """`kind` activation of a convolution's output (quantised as the int8 graph computes it)."""
    if not self.quantize:
      return _ACTIVATIONS[kind](x)
    if kind in ('relu', 'relu6'):  # fused into the convolution: one int8 tensor after it
      return self.q(_ACTIVATIONS[kind](x), name)
    # hard-swish at int8: x * relu6(x + 3), the 1/6 folded into the next op's scale
    x, gate = self.hard_gate(x, f'{name}_in', f'{name}_gate')
    return self.q(x * gate / 6.0, name)

  def hard_gate(self, s: jax.Array, in_name: str, gate_name: str
                ) -> tuple[jax.Array, jax.Array]:
    """Quantised `s` and `relu6(s + 3)` (6 x hard-sigmoid), the two int8 tensors of a gate."""
    s = self.q(s, in_name)
    return s, self.q(jnp.clip(s + 3.0, 0.0, 6.0), gate_name)

  def bn(self, name: str) -> nn.BatchNorm:
    # Quantisation-aware fine-tuning keeps the running statistics (frozen BatchNorm): the
    # converter folds exactly these into the int8 kernels.
    return nn.BatchNorm(use_running_average=not self.train or self.quantize, momentum=BN_MOMENTUM,
                        epsilon=BN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=name)


class SqueezeExcite(nn.Module):
  """x * hard_sigmoid(conv_expand(relu(conv_reduce(mean_hw(x))))); `(B,H,W,C)` -> same."""

  se_chs: int
  quantize: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train, self.quantize)
    s = layers.q(jnp.mean(x, axis=(1, 2), keepdims=True), 'q_mean')
    s = layers.act(layers.conv(self.se_chs, 1, bias=True, name='conv_reduce')(s), 'relu',
                   'q_reduce')
    s = layers.conv(x.shape[-1], 1, bias=True, name='conv_expand')(s)
    if not self.quantize:
      return x * jax.nn.hard_sigmoid(s)
    _, gate = layers.hard_gate(s, 'q_expand', 'q_gate')
    return layers.q(x * gate / 6.0, 'q_out')


class Block(nn.Module):
  """One MobileNetV3 block (`BlockConfig.kind`); `(B,H,W,in)` -> `(B,H/s,W/s,out)`.

  Parameter names are timm's: ds = conv_dw, bn1, se, conv_pw, bn2; ir = conv_pw, bn1, conv_dw,
  bn2, se, conv_pwl, bn3; cn = conv, bn1.
  """

  config: BlockConfig
  drop_path_rate: float = 0.0
  depthwise: str = 'auto'
  quantize: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c = self.config
    layers = _Layers(self.dtype, self.param_dtype, train, self.quantize)
    shortcut = x
    if c.kind == 'cn':
      x = layers.conv(c.out_chs, c.kernel, c.stride, name='conv')(x)
      return layers.act(layers.bn('bn1')(x), c.act, 'q_act')
    if c.kind == 'ir':
      x = layers.bn('bn1')(layers.conv(c.mid_chs, 1, name='conv_pw')(x))
      x = layers.act(x, c.act, 'q_pw')
      dw_bn, pw_name, pw_bn = 'bn2', 'conv_pwl', 'bn3'
    else:  # 'ds'
      dw_bn, pw_name, pw_bn = 'bn1', 'conv_pw', 'bn2'
    x = DepthwiseConv(c.kernel, c.stride, impl=self.depthwise, quantize=self.quantize,
                      dtype=self.dtype, param_dtype=self.param_dtype, name='conv_dw')(x)
    x = layers.act(layers.bn(dw_bn)(x), c.act, 'q_dw')
    if c.se_chs:
      x = SqueezeExcite(c.se_chs, self.quantize, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='se')(x, train)
    x = layers.q(layers.bn(pw_bn)(layers.conv(c.out_chs, 1, name=pw_name)(x)), 'q_pwl')
    if c.has_skip:
      rate = self.drop_path_rate * c.drop_path
      if rate > 0:  # stochastic depth: drop the whole residual branch per example
        x = nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train)(x)
      x = layers.q(x + shortcut, 'q_add')
    return x


class MobileNetV3(nn.Module):
  """MobileNetV3 classifier taking `(B, H, W, 3)` images in [0, 1].

  Attributes:
    num_classes: classifier outputs.
    variant: 'large' or 'small'.
    width_mult: channel multiplier (timm presets: large 0.75 / 1.0, small 0.5 / 0.75 / 1.0).
    drop_rate: dropout before the classifier, train only (0.2 as in the MobileNetV3 paper and
      timm's training recipe; timm's constructor default is 0, which only matters in training).
    drop_path_rate: stochastic depth of the last block; earlier blocks scale linearly.
    depthwise: depthwise-convolution implementation, 'auto' (per backend at trace time),
      'conv' (grouped convolution; what TFLite export uses), 'shifted' (sum of shifted
      slices in plain JAX) or 'cpu_kernel' (an XLA:CPU custom call, the fastest on the CPU);
      see `kdflax.models.depthwise`. Parameters and results are the same for all four.
    quantize: simulate the full-int8 `.tflite` (`kdflax.models.quant`) for quantisation-aware
      fine-tuning: same parameters, plus activation ranges in `batch_stats`. Export always
      lowers the float model (`quantize=False`); the converter does the rounding.
    dtype: compute dtype (e.g. bfloat16); logits are always float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  variant: str = 'large'
  width_mult: float = 1.0
  drop_rate: float = 0.2
  drop_path_rate: float = 0.0
  depthwise: str = 'auto'
  quantize: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    block_configs(self.variant, self.width_mult)  # a bad variant / width fails on creation
    check_impl(self.depthwise)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`(B, H, W, 3)` in [0, 1] -> `(B, num_classes)` float32 logits.

    Sows `stage0..stage3` (strides 4, 8, 16, 32) into 'intermediates' when it is mutable.
    With `train=True`, pass `mutable=['batch_stats']` and a 'dropout' rng if any rate > 0.
    """
    stages = block_configs(self.variant, self.width_mult)
    layers = _Layers(self.dtype, self.param_dtype, train, self.quantize)
    x = layers.q(normalize(x, self.dtype), 'q_input')

    x = layers.conv(stem_features(self.width_mult), 3, 2, name='conv_stem')(x)
    x = layers.act(layers.bn('bn1')(x), 'hard_swish', 'q_stem')
    feature_stages = FEATURE_STAGES[self.variant]
    for i, blocks in enumerate(stages):
      for j, config in enumerate(blocks):
        x = Block(config, self.drop_path_rate, self.depthwise, self.quantize, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'blocks_{i}_{j}')(x, train)
      if i in feature_stages:
        self.sow('intermediates', f'stage{feature_stages.index(i)}', x)

    x = layers.q(jnp.mean(x, axis=(1, 2), keepdims=True), 'q_pool')   # (B, 1, 1, C)
    x = layers.conv(HEAD_FEATURES[self.variant], 1, bias=True, name='conv_head')(x)
    x = layers.act(x, 'hard_swish', 'q_head').reshape(x.shape[0], -1)   # (B, head)
    x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    extra = {'dot_general': quant.quantized_dot_general} if self.quantize else {}
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='classifier', **extra)(x)
    return layers.q(x, 'q_logits').astype(jnp.float32)
