"""Swin Transformer (Liu et al., 2021) in Flax, numerically equal to timm's `SwinTransformer`.

    module, size = create_model('swin_tiny_patch4_window7_224', num_classes=10)
    logits = module.apply(variables, images)              # (B, 224, 224, 3) in [0, 1] -> (B, 10)
    logits, state = module.apply(variables, images, mutable=['intermediates'])
    state['intermediates']['stage3']                      # ((B, 7, 7, 768),)
    state['intermediates']['stage3_attn']                 # ((B * 1, 24, 49, 49),)

Layout (parameter names follow timm's module names, `layers.{i}` -> `layers_{i}`):
patch embedding (conv p x p, stride p, then LayerNorm) -> 4 stages -> LayerNorm -> global
average pool -> head. Stage i > 0 starts with PatchMerging (2 x 2 neighbours concatenated in
timm's order (0,0), (1,0), (0,1), (1,1) -> LayerNorm -> Linear without bias, channels x 2).
Blocks alternate plain windows and windows shifted by `window // 2` (static `jnp.roll`); when
the window covers a stage's grid the window is clipped to the grid and nothing is shifted.
The shift mask and the relative-position index are NumPy constants built at trace time, so
the variables are only `{'params': ...}`. The window geometry and `WindowAttention` live in
`kdflax.models.swin_windows`, the MLP in `kdflax.models.layers`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdflax.models.layers import Dtype, DtypeModule, Mlp, dense
from kdflax.models.layout import ModelLayout
from kdflax.models.preprocess import normalize
from kdflax.models.swin_windows import (
  MASK_VALUE,
  WindowAttention,
  block_window_shift,
  num_stage_windows,
  relative_position_index,
  shifted_window_mask,
  stage_grid_sizes,
  window_partition,
  window_reverse,
)

__all__ = ['LAYER_NORM_EPS', 'MASK_VALUE', 'Mlp', 'PatchEmbed', 'PatchMerging', 'SwinBlock',
           'SwinStage', 'SwinTransformer', 'WindowAttention', 'attention_key',
           'block_window_shift', 'num_stage_windows', 'relative_position_index',
           'shifted_window_mask', 'stage_grid_sizes', 'window_partition', 'window_reverse']

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.

# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)), used by timm's patch embed.
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def attention_key(stage: int) -> str:
  """The intermediates key of stage `stage`'s window attention (last block), `stage{i}_attn`."""
  return f'stage{stage}_attn'


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch: E[x^2] - E[x]^2 loses precision on the large activations
  # of late Swin stages.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


# ---------------------------------------------------------------- modules


class _BlockSettings(DtypeModule, kw_only=True):
  """The keyword-only fields the model hands down through its stages to every block.

  Attributes:
    mlp_ratio: MLP hidden width / channels.
    attn_drop_rate: dropout on the attention weights.
    proj_drop_rate: dropout after the attention projection and in the MLPs.
    dtype, param_dtype: as `DtypeModule` (softmax and logits stay float32).
  """

  mlp_ratio: float = 4.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0

  def _block_settings(self) -> dict[str, Any]:
    """These fields as keyword arguments, to build a stage or block with the same settings."""
    return dict(mlp_ratio=self.mlp_ratio, attn_drop_rate=self.attn_drop_rate,
                proj_drop_rate=self.proj_drop_rate, dtype=self.dtype,
                param_dtype=self.param_dtype)


class SwinBlock(_BlockSettings):
  """One (shifted-)window transformer block: `(B, H, W, C)` -> same shape, plus attention.

  `window` and `shift` are already resolved for this block's grid (`block_window_shift`).
  Grids that the window does not divide are zero-padded at the bottom/right after the shift,
  as in timm. Stochastic depth drops each residual branch per sample (`'dropout'` rng).
  """

  dim: int
  num_heads: int
  window: int
  shift: int = 0
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    b, h, w, c = x.shape
    win, shift = self.window, self.shift

    y = _layer_norm('norm1', self.dtype, self.param_dtype)(x)
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    pad_h, pad_w = (-h) % win, (-w) % win
    if pad_h or pad_w:
      y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = shifted_window_mask(hp, wp, win, shift) if shift else None
    y, attn = WindowAttention(
        self.dim, self.num_heads, win, attn_drop_rate=self.attn_drop_rate,
        proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, param_dtype=self.param_dtype,
        name='attn')(window_partition(y, win), mask, train)
    y = window_reverse(y, win, hp, wp)[:, :h, :w]
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name='drop_path1')(
        y, deterministic=not train)
    x = x + y

    x = x.reshape(b, h * w, c)  # keep Dense inputs rank 3 (TFLite friendly)
    y = _layer_norm('norm2', self.dtype, self.param_dtype)(x)
    y = Mlp(int(c * self.mlp_ratio), self.proj_drop_rate, dtype=self.dtype,
            param_dtype=self.param_dtype, name='mlp')(y, train)
    y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2), name='drop_path2')(
        y, deterministic=not train)
    return (x + y).reshape(b, h, w, c), attn


class PatchMerging(DtypeModule):
  """`(B, H, W, C)` -> `(B, ceil(H/2), ceil(W/2), out_dim)`: 2 x 2 concat, LayerNorm, Linear.

  The four neighbours are concatenated as (row, col) = (0,0), (1,0), (0,1), (1,1), the order
  of timm's reshape/permute and of the original implementation. Odd sizes are zero-padded.
  """

  out_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
    x = _layer_norm('norm', self.dtype, self.param_dtype)(x)
    x = dense(self.out_dim, 'reduction', self.dtype, self.param_dtype, use_bias=False)(x)
    return x.reshape(b, h2, w2, self.out_dim)


class SwinStage(_BlockSettings):
  """Optional PatchMerging, then `depth` blocks on a `grid x grid` token map.

  Returns the stage output `(B, grid, grid, dim)` and the last block's attention weights.
  """

  dim: int
  depth: int
  num_heads: int
  grid: int
  window_size: int
  downsample: bool
  drop_path_rates: Sequence[float] = ()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if self.downsample:
      x = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='downsample')(x)
    attn = None
    for j in range(self.depth):
      window, shift = block_window_shift(self.grid, self.window_size, j)
      x, attn = SwinBlock(
          self.dim, self.num_heads, window, shift,
          drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0,
          name=f'blocks_{j}', **self._block_settings())(x, train)
    return x, attn


class PatchEmbed(DtypeModule):
  """`(B, H, W, 3)` -> `(B, H/p, W/p, dim)`: non-overlapping p x p conv, then LayerNorm."""

  dim: int
  patch_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', kernel_init=_conv_init,
                dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    return _layer_norm('norm', self.dtype, self.param_dtype)(x)


class SwinTransformer(_BlockSettings):
  """Swin Transformer classifier taking `(B, img_size, img_size, 3)` images in [0, 1].

  Attributes:
    num_classes: classifier outputs.
    img_size: square input resolution (fixes the per-stage windows, as in timm).
    embed_dim: channels of stage 0; stage i has `embed_dim * 2**i`.
    depths: blocks per stage.
    num_heads: attention heads per stage.
    window_size: attention window side (clipped per stage to the stage's grid).
    patch_size: side of the patch-embedding conv (and its stride).
    mlp_ratio: MLP hidden width / channels.
    drop_rate: dropout before the classifier (timm's `drop_rate`).
    proj_drop_rate: dropout after the attention projection and in the MLPs.
    attn_drop_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth; block k of all K blocks drops with rate
      `drop_path_rate * k / (K - 1)` (timm's linear schedule).
    dtype: compute dtype (e.g. `jnp.bfloat16`); softmax and logits stay float32.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  img_size: int = 224
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0

  def stage_dims(self) -> tuple[int, ...]:
    """Channels of each stage's output."""
    return tuple(int(self.embed_dim * 2 ** i) for i in range(len(self.depths)))

  def attention_layout(self) -> tuple[tuple[int, int, int, int], ...]:
    """Per stage, `(height, width, window, shift)` of its last block at `img_size`.

    Plain Python (works on an unbound module). `stage{i}_attn` has shape
    `(B * nW, heads_i, window^2, window^2)`, its windows row-major over the grid rolled by
    `-shift` (rows and columns). When the window does not divide the grid, the rolled grid
    was zero-padded at the bottom/right to a multiple of the window first (timm's order), so
    `nW = ceil(height / window) * ceil(width / window)` (`num_stage_windows`).
    """
    grids = stage_grid_sizes(self.img_size, self.patch_size, len(self.depths))
    layout = []
    for grid, depth in zip(grids, self.depths, strict=True):
      window, shift = block_window_shift(grid, self.window_size, depth - 1)
      layout.append((grid, grid, window, shift))
    return tuple(layout)

  def distill_layout(self) -> ModelLayout:
    """`stage{i}_attn` is window attention laid out as `attention_layout()[i]`."""
    return ModelLayout(window_attention={
        attention_key(i): layout for i, layout in enumerate(self.attention_layout())})

  def _drop_path_rates(self) -> list[tuple[float, ...]]:
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))  # one block: [0.0]
    out, start = [], 0
    for depth in self.depths:
      out.append(tuple(float(r) for r in rates[start:start + depth]))
      start += depth
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """`(B, img_size, img_size, 3)` in [0, 1] -> `(B, num_classes)` float32 logits.

    Sows `stage{i}` `(B, H_i, W_i, C_i)` and `stage{i}_attn` `(B * nW_i, heads_i, N_i, N_i)`
    into `'intermediates'` (a no-op unless that collection is mutable).
    """
    if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
      raise ValueError(f'SwinTransformer(img_size={self.img_size}) expects images of shape '
                       f'(B, {self.img_size}, {self.img_size}, 3), got {tuple(x.shape)}')
    if len(self.depths) != len(self.num_heads) or min(self.depths, default=0) < 1:
      raise ValueError(f'depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} '
                       'must have one positive entry per stage')
    x = normalize(x, self.dtype)

    x = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='patch_embed')(x)
    grids = stage_grid_sizes(self.img_size, self.patch_size, len(self.depths))
    rates = self._drop_path_rates()
    for i, (dim, depth, heads) in enumerate(
        zip(self.stage_dims(), self.depths, self.num_heads, strict=True)):
      x, attn = SwinStage(
          dim, depth, heads, grids[i], self.window_size, downsample=i > 0,
          drop_path_rates=rates[i], name=f'layers_{i}', **self._block_settings())(x, train)
      self.sow('intermediates', f'stage{i}', x)
      self.sow('intermediates', attention_key(i), attn)

    x = _layer_norm('norm', self.dtype, self.param_dtype)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    x = nn.Dropout(self.drop_rate, name='head_drop')(x, deterministic=not train)
    x = dense(self.num_classes, 'head', self.dtype, self.param_dtype)(x)
    return x.astype(jnp.float32)
