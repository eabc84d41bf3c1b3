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
the variables are only `{'params': ...}`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdflax.models.layout import ModelLayout
from kdflax.models.preprocess import normalize

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.
MASK_VALUE = -100.0    # timm's additive mask between tokens of different shifted regions.

Dtype = Any
_dense_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init (kaiming_uniform with a=sqrt(5)), used by timm's patch embed.
_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# ---------------------------------------------------------------- static layout helpers


def attention_key(stage: int) -> str:
  """The intermediates key of stage `stage`'s window attention (last block), `stage{i}_attn`."""
  return f'stage{stage}_attn'


def stage_grid_sizes(img_size: int, patch_size: int, num_stages: int) -> tuple[int, ...]:
  """Token grid side per stage: `img_size // patch_size`, then halved (rounding up)."""
  grids = [img_size // patch_size]
  for _ in range(num_stages - 1):
    grids.append((grids[-1] + 1) // 2)
  return tuple(grids)


def block_window_shift(grid: int, window_size: int, block_index: int) -> tuple[int, int]:
  """`(window, shift)` of block `block_index` in a stage whose grid side is `grid`.

  Odd blocks shift by `window // 2`. As in timm, a window that covers the grid is clipped to
  it and then never shifted (a cyclic shift of a single window would change nothing useful).
  """
  if grid <= window_size:
    return grid, 0
  return window_size, (window_size // 2 if block_index % 2 else 0)


def relative_position_index(window: int) -> np.ndarray:
  """`(N, N)` int32 index into the `((2w - 1)^2, heads)` bias table, `N = window^2`.

  Entry (i, j) encodes the offset of token i relative to token j (row-major in the window):
  `(dy + w - 1) * (2w - 1) + (dx + w - 1)`.
  """
  ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing='ij')
  coords = np.stack([ys.reshape(-1), xs.reshape(-1)])          # (2, N)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), in [0, 2w - 2]
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """Additive `(nW, N, N)` float32 mask for shifted windows on a `(height, width)` grid.

  After rolling by `-shift`, the last window along each axis holds tokens from the far edge
  of the image; tokens from different regions (timm's 3 x 3 labelling of the grid into
  `[0, H - w)`, `[H - w, H - shift)`, `[H - shift, H)`) get `MASK_VALUE`, others 0.
  Windows are ordered row-major, as `window_partition` produces them.
  """
  def labels(size: int) -> np.ndarray:
    out = np.zeros(size, np.int32)
    out[size - window:] = 1
    out[size - shift:] = 2
    return out

  region = labels(height)[:, None] * 3 + labels(width)[None, :]   # (H, W)
  region = region.reshape(height // window, window, width // window, window)
  region = region.transpose(0, 2, 1, 3).reshape(-1, window * window)  # (nW, N)
  differ = region[:, :, None] != region[:, None, :]
  return np.where(differ, MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
  """`(B, H, W, C)` -> `(B * nW, window^2, C)`, windows row-major within each image."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
  """`(B * nW, window^2, C)` -> `(B, height, width, C)`; inverse of `window_partition`."""
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch: E[x^2] - E[x]^2 loses precision on the large activations
  # of late Swin stages.
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, dtype=dtype,
                      param_dtype=param_dtype, name=name)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype,
           use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=_dense_init, dtype=dtype,
                  param_dtype=param_dtype, name=name)


# ---------------------------------------------------------------- modules


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative-position bias.

  Takes `(B * nW, N, C)` window tokens (`N = window^2`) and an optional `(nW, N, N)` additive
  mask; returns the `(B * nW, N, C)` output and the float32 softmax weights
  `(B * nW, heads, N, N)` (before attention dropout).
  """

  dim: int
  num_heads: int
  window: int
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    b_, n, c = x.shape
    heads = self.num_heads
    head_dim = self.dim // heads
    qkv = _dense(3 * self.dim, 'qkv', self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(b_, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                       # (B * nW, heads, N, head_dim)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum('bhnd,bhmd->bhnm', q, k).astype(jnp.float32)

    table = self.param('relative_position_bias_table', _dense_init,
                       ((2 * self.window - 1) ** 2, heads), self.param_dtype)
    index = relative_position_index(self.window).reshape(-1)
    bias = jnp.take(table, index, axis=0).reshape(n, n, heads).transpose(2, 0, 1)
    logits = logits + bias.astype(jnp.float32)[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, heads, n, n) + mask[None, :, None]
      logits = logits.reshape(-1, heads, n, n)
    attn = jax.nn.softmax(logits, axis=-1)

    weights = nn.Dropout(self.attn_drop_rate, name='attn_drop')(attn, deterministic=not train)
    out = jnp.einsum('bhnm,bhmd->bhnd', weights.astype(v.dtype), v)
    out = out.transpose(0, 2, 1, 3).reshape(b_, n, self.dim)
    out = _dense(self.dim, 'proj', self.dtype, self.param_dtype)(out)
    out = nn.Dropout(self.proj_drop_rate, name='proj_drop')(out, deterministic=not train)
    return out, attn


class Mlp(nn.Module):
  """Linear -> exact (erf) GELU -> dropout -> Linear -> dropout on `(B, L, C)` tokens."""

  hidden_dim: int
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    x = _dense(self.hidden_dim, 'fc1', self.dtype, self.param_dtype)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.drop_rate, name='drop1')(x, deterministic=not train)
    x = _dense(dim, 'fc2', self.dtype, self.param_dtype)(x)
    return nn.Dropout(self.drop_rate, name='drop2')(x, deterministic=not train)


class SwinBlock(nn.Module):
  """One (shifted-)window transformer block: `(B, H, W, C)` -> same shape, plus attention.

  `window` and `shift` are already resolved for this block's grid (`block_window_shift`).
  Grids that the window does not divide are zero-padded at the bottom/right after the shift,
  as in timm. Stochastic depth drops each residual branch per sample (`'dropout'` rng).
  """

  dim: int
  num_heads: int
  window: int
  shift: int = 0
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

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


class PatchMerging(nn.Module):
  """`(B, H, W, C)` -> `(B, ceil(H/2), ceil(W/2), out_dim)`: 2 x 2 concat, LayerNorm, Linear.

  The four neighbours are concatenated as (row, col) = (0,0), (1,0), (0,1), (1,1), the order
  of timm's reshape/permute and of the original implementation. Odd sizes are zero-padded.
  """

  out_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2 * w2, 4 * c)
    x = _layer_norm('norm', self.dtype, self.param_dtype)(x)
    x = _dense(self.out_dim, 'reduction', self.dtype, self.param_dtype, use_bias=False)(x)
    return x.reshape(b, h2, w2, self.out_dim)


class SwinStage(nn.Module):
  """Optional PatchMerging, then `depth` blocks on a `grid x grid` token map.

  Returns the stage output `(B, grid, grid, dim)` and the last block's attention weights.
  """

  dim: int
  depth: int
  num_heads: int
  grid: int
  window_size: int
  downsample: bool
  mlp_ratio: float = 4.0
  drop_path_rates: Sequence[float] = ()
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if self.downsample:
      x = PatchMerging(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='downsample')(x)
    attn = None
    for j in range(self.depth):
      window, shift = block_window_shift(self.grid, self.window_size, j)
      x, attn = SwinBlock(
          self.dim, self.num_heads, window, shift, mlp_ratio=self.mlp_ratio,
          drop_path_rate=self.drop_path_rates[j] if self.drop_path_rates else 0.0,
          attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f'blocks_{j}')(x, train)
    return x, attn


class PatchEmbed(nn.Module):
  """`(B, H, W, 3)` -> `(B, H/p, W/p, dim)`: non-overlapping p x p conv, then LayerNorm."""

  dim: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', kernel_init=_conv_init,
                dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    return _layer_norm('norm', self.dtype, self.param_dtype)(x)


class SwinTransformer(nn.Module):
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
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

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
          mlp_ratio=self.mlp_ratio, drop_path_rates=rates[i],
          attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f'layers_{i}')(x, train)
      self.sow('intermediates', f'stage{i}', x)
      self.sow('intermediates', attention_key(i), attn)

    x = _layer_norm('norm', self.dtype, self.param_dtype)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    x = nn.Dropout(self.drop_rate, name='head_drop')(x, deterministic=not train)
    x = _dense(self.num_classes, 'head', self.dtype, self.param_dtype)(x)
    return x.astype(jnp.float32)


def num_stage_windows(layout: tuple[int, int, int, int]) -> int:
  """Windows per image of a stage described by one `attention_layout()` entry."""
  height, width, window, _ = layout
  return math.ceil(height / window) * math.ceil(width / window)
