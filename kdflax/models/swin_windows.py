"""Swin's window attention: the static window geometry and the `WindowAttention` module.

Geometry helpers are plain functions of Python ints (NumPy constants at trace time) and
shape-only reshapes of JAX arrays; `kdflax.models.swin` builds its blocks on them and
re-exports them.

    window, shift = block_window_shift(grid=14, window_size=7, block_index=1)   # (7, 3)
    windows = window_partition(x, window)           # (B, H, W, C) -> (B * nW, window^2, C)
    mask = shifted_window_mask(14, 14, window, shift)                          # (4, 49, 49)
    out, attn = WindowAttention(dim, heads, window, name='attn')(windows, mask)
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdflax.models.layers import TRUNC_NORMAL_02, DtypeModule, dense

MASK_VALUE = -100.0    # timm's additive mask between tokens of different shifted regions.


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


def num_stage_windows(layout: tuple[int, int, int, int]) -> int:
  """Windows per image of a stage described by one `attention_layout()` entry."""
  height, width, window, _ = layout
  return math.ceil(height / window) * math.ceil(width / window)


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


# ---------------------------------------------------------------- module


class WindowAttention(DtypeModule):
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

  @nn.compact
  def __call__(self, x: jax.Array, mask: np.ndarray | None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    b_, n, c = x.shape
    heads = self.num_heads
    head_dim = self.dim // heads
    qkv = dense(3 * self.dim, 'qkv', self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(b_, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]                       # (B * nW, heads, N, head_dim)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum('bhnd,bhmd->bhnm', q, k).astype(jnp.float32)

    table = self.param('relative_position_bias_table', TRUNC_NORMAL_02,
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
    out = dense(self.dim, 'proj', self.dtype, self.param_dtype)(out)
    out = nn.Dropout(self.proj_drop_rate, name='proj_drop')(out, deterministic=not train)
    return out, attn
