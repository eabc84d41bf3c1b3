"""Spatial maps from model intermediates, resolution alignment, attention-transfer distances.

Every sown tensor becomes a spatial map `(B, H, W)`:

- Swin window attention `(B * nW, heads, N, N)`, `N = window^2`: `window_attention_map` takes,
  for every key token, the attention it RECEIVES (mean over heads and queries), merges the
  windows back into the `(H, W)` grid and undoes the cyclic shift. The static layout
  `(height, width, window, shift)` describes the block: Swin rolls the grid by `-shift`,
  pads it at the bottom/right to a multiple of the window, and partitions it into windows
  that are row-major over the `(ceil(H / ws), ceil(W / ws))` grid, batch outermost.
- Feature maps `(B, H, W, C)` (CNN and Swin stage outputs): `activation_map` is
  `mean_c |F|^p` (p = 2 by default).
- ViT tokens `(B, P + N, C)`: `tokens_to_grid` drops the `P` prefix tokens and reshapes the
  rest to `(B, h, w, C)` (square `N`, or a given `(h, w)`), then `activation_map`.

`align(maps, size)` resizes `(B, H, W)` maps, `resize_features` `(B, H, W, C)` features, each
spatial axis separately: downsampling averages boxes (the exact area integral, so 96 -> 56
works like 96 -> 48), upsampling is bilinear with half-pixel centres; an axis whose size
does not change is untouched, and a map aligned to its own size is returned as is.

Attention transfer (Zagoruyko & Komodakis, 2017), `at_loss`, for features of any sizes and
widths, with `q = mean_c F^2` and the teacher map resized to the student grid `(h, w)`:

    at_loss = 1 / (B h w) * sum_b sum_i (q_s[b, i] / ||q_s[b]||_2 - q_t[b, i] / ||q_t[b]||_2)^2

(the reference implementation's `(at(x) - at(y)).pow(2).mean()`; its beta / 2 = 500 is left to
the configured weight). The alternative normalisation is a spatial softmax at temperature
`tau` compared by `KL(softmax(q_t / tau) || softmax(q_s / tau))`, summed over positions and
averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdflax.distill.losses import kl_per_example, masked_mean, upcast

Array = jax.Array
SwinLayout = tuple[int, int, int | tuple[int, int], int | tuple[int, int]]

NORMALIZATIONS = ('l2', 'softmax')


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise ValueError(f'{name} must be an int or a pair of ints, got {value!r}')
    return int(value[0]), int(value[1])
  return int(value), int(value)


def window_grid(layout: SwinLayout) -> tuple[int, int, int, int, int, int]:
  """`(height, width, win_h, win_w, windows_h, windows_w)` for a Swin layout, validated."""
  if len(layout) != 4:
    raise ValueError(f'a Swin layout is (height, width, window, shift), got {layout!r}')
  height, width = int(layout[0]), int(layout[1])
  win_h, win_w = _pair(layout[2], 'window')
  if min(height, width, win_h, win_w) < 1:
    raise ValueError(f'Swin layout sizes must be positive, got {layout!r}')
  return height, width, win_h, win_w, -(-height // win_h), -(-width // win_w)


def window_attention_shape_error(shape: Sequence[int], layout: SwinLayout) -> str | None:
  """Why a `(B * nW, heads, N, N)` shape does not fit `layout`, or None when it does."""
  _, _, win_h, win_w, n_h, n_w = window_grid(layout)
  if len(shape) != 4 or shape[2] != shape[3]:
    return f'expected window attention (B * nW, heads, N, N), got shape {tuple(shape)}'
  if shape[2] != win_h * win_w:
    return (f'N = {shape[2]} tokens per window but the layout {tuple(layout)} has windows of '
            f'{win_h} x {win_w} = {win_h * win_w}')
  if shape[0] % (n_h * n_w):
    return (f'leading dimension {shape[0]} is not a multiple of the {n_h} x {n_w} windows '
            f'of layout {tuple(layout)}')
  return None


def window_attention_map(attn: Array, layout: SwinLayout) -> Array:
  """Attention received per token `(B, H, W)` from Swin window attention.

  Args:
    attn: `(B * nW, heads, N, N)` softmax weights, `[..., query, key]`.
    layout: `(height, width, window, shift)` of the block (window and shift may be pairs).

  Returns:
    `(B, height, width)`: for each token, the mean over heads and queries of its window's
    attention to it, at the token's position in the un-shifted image grid.
  """
  error = window_attention_shape_error(attn.shape, layout)
  if error:
    raise ValueError(error)
  height, width, win_h, win_w, n_h, n_w = window_grid(layout)
  shift_h, shift_w = _pair(layout[3], 'shift')
  received = jnp.mean(upcast(attn), axis=(1, 2))           # (B * nW, N)
  batch = attn.shape[0] // (n_h * n_w)
  maps = received.reshape(batch, n_h, n_w, win_h, win_w)
  maps = maps.transpose(0, 1, 3, 2, 4).reshape(batch, n_h * win_h, n_w * win_w)
  maps = maps[:, :height, :width]                                       # drop the padding
  if shift_h or shift_w:
    maps = jnp.roll(maps, (shift_h, shift_w), axis=(1, 2))              # undo roll(-shift)
  return maps


def activation_map(features: Array, p: float = 2.0) -> Array:
  """`mean_c |F|^p`: `(B, H, W, C)` features -> `(B, H, W)` map."""
  if features.ndim != 4:
    raise ValueError(f'features must be (B, H, W, C), got shape {features.shape}')
  features = upcast(features)
  powered = features * features if p == 2 else jnp.abs(features) ** p
  return jnp.mean(powered, axis=-1)


def token_grid(num_tokens: int, grid: Sequence[int] | None = None) -> tuple[int, int]:
  """The `(h, w)` grid of `num_tokens` patch tokens: `grid` if given, else the square one."""
  if grid is not None:
    h, w = _pair(grid, 'grid')
    if h * w != num_tokens:
      raise ValueError(f'token grid {h} x {w} does not hold {num_tokens} tokens')
    return h, w
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(f'{num_tokens} tokens are not a square grid; give the (h, w) grid')
  return side, side


def tokens_to_grid(tokens: Array, num_prefix_tokens: int = 0,
                   grid: Sequence[int] | None = None) -> Array:
  """ViT tokens `(B, P + N, C)` -> patch features `(B, h, w, C)` (prefix tokens dropped)."""
  if tokens.ndim != 3:
    raise ValueError(f'tokens must be (B, P + N, C), got shape {tokens.shape}')
  if not 0 <= num_prefix_tokens < tokens.shape[1]:
    raise ValueError(f'num_prefix_tokens {num_prefix_tokens} leaves no patch tokens in '
                     f'{tokens.shape[1]}')
  patches = tokens[:, num_prefix_tokens:]
  h, w = token_grid(patches.shape[1], grid)
  return patches.reshape(tokens.shape[0], h, w, tokens.shape[2])


def resize_matrix(src: int, dst: int) -> np.ndarray:
  """`(dst, src)` float64 interpolation weights along one axis; every row sums to 1.

  `dst < src`: box (area) averaging, output cell i covers source interval
  `[i * src / dst, (i + 1) * src / dst)` and each source pixel is weighted by its overlap.
  `dst > src`: bilinear with half-pixel centres (`align_corners=False`), clamped at borders.
  `dst == src`: the identity.
  """
  if src < 1 or dst < 1:
    raise ValueError(f'sizes must be positive, got {src} -> {dst}')
  if dst == src:
    return np.eye(src)
  weights = np.zeros((dst, src))
  if dst < src:
    scale = src / dst
    for i in range(dst):
      lo, hi = i * scale, (i + 1) * scale
      for j in range(int(math.floor(lo)), min(int(math.ceil(hi)), src)):
        weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
  else:
    for i in range(dst):
      x = min(max((i + 0.5) * src / dst - 0.5, 0.0), src - 1.0)
      j0 = int(math.floor(x))
      j1 = min(j0 + 1, src - 1)
      frac = x - j0
      weights[i, j0] += 1.0 - frac
      weights[i, j1] += frac
  return weights


def _resize_spatial(x: Array, size: Sequence[int], subscripts: str) -> Array:
  h, w = _pair(size, 'size')
  if (h, w) == tuple(x.shape[1:3]):
    return x
  x = upcast(x)
  rows = jnp.asarray(resize_matrix(x.shape[1], h), x.dtype)
  cols = jnp.asarray(resize_matrix(x.shape[2], w), x.dtype)
  return jnp.einsum(subscripts, rows, x, cols,
                    precision=jax.lax.Precision.HIGHEST)


def align(maps: Array, size: Sequence[int]) -> Array:
  """Resizes `(B, H, W)` maps to `(B, h, w)`: area downsampling, bilinear upsampling.

  Each axis is resized on its own; `align(maps, maps.shape[1:])` returns `maps` itself.
  """
  if maps.ndim != 3:
    raise ValueError(f'maps must be (B, H, W), got shape {maps.shape}')
  return _resize_spatial(maps, size, 'hH,bHW,wW->bhw')


def resize_features(features: Array, size: Sequence[int]) -> Array:
  """Resizes `(B, H, W, C)` features to `(B, h, w, C)` with the interpolation of `align`."""
  if features.ndim != 4:
    raise ValueError(f'features must be (B, H, W, C), got shape {features.shape}')
  return _resize_spatial(features, size, 'hH,bHWc,wW->bhwc')


def normalize_maps(maps: Array, method: str = 'l2', temperature: float = 1.0) -> Array:
  """`(B, H, W)` maps -> `(B, H * W)`: unit L2 norm per map, or a spatial softmax at `T`."""
  flat = upcast(maps.reshape(maps.shape[0], -1))
  if method == 'l2':
    norm = jnp.sqrt(jnp.sum(flat * flat, axis=-1, keepdims=True))
    return flat / jnp.maximum(norm, 1e-12)
  if method == 'softmax':
    return jax.nn.softmax(flat / temperature, axis=-1)
  raise ValueError(f'normalize must be one of {NORMALIZATIONS}, got {method!r}')


def map_distance(student_maps: Array, teacher_maps: Array, method: str = 'l2',
                 temperature: float = 1.0, mask: Array | None = None) -> Array:
  """Distance between same-size `(B, h, w)` maps, a scalar.

  `l2`: mean over batch and positions of the squared difference of L2-normalised maps.
  `softmax`: `KL(softmax(t / T) || softmax(s / T))` over positions, mean over the batch.
  """
  if student_maps.shape != teacher_maps.shape:
    raise ValueError(f'maps to compare must have one shape, got student {student_maps.shape} '
                     f'and teacher {teacher_maps.shape}; align them first')
  if method == 'l2':
    diff = normalize_maps(student_maps, 'l2') - normalize_maps(teacher_maps, 'l2')
    return masked_mean(jnp.mean(diff * diff, axis=-1), mask)
  if method == 'softmax':
    log_softmax = lambda m: jax.nn.log_softmax(upcast(m.reshape(m.shape[0], -1)) / temperature,
                                               axis=-1)
    return masked_mean(kl_per_example(log_softmax(teacher_maps), log_softmax(student_maps)),
                       mask)
  raise ValueError(f'normalize must be one of {NORMALIZATIONS}, got {method!r}')


def at_loss(student_features: Array, teacher_features: Array, p: float = 2.0,
            mask: Array | None = None) -> Array:
  """Attention transfer between `(B, H_s, W_s, C_s)` and `(B, H_t, W_t, C_t)` features.

  Maps `mean_c |F|^p`, the teacher's aligned to the student grid, L2-normalised; the mean
  squared difference over batch and positions (see the module docstring). Sizes and widths
  may differ freely.
  """
  if student_features.shape[0] != teacher_features.shape[0]:
    raise ValueError(f'batch sizes differ: student {student_features.shape}, '
                     f'teacher {teacher_features.shape}')
  student_maps = activation_map(student_features, p)
  teacher_maps = align(activation_map(teacher_features, p), student_maps.shape[1:])
  return map_distance(student_maps, teacher_maps, 'l2', mask=mask)


def attention_loss(student_maps: Mapping[str, Array], teacher_maps: Mapping[str, Array],
                   weights: Mapping[str, float], method: str = 'l2', temperature: float = 1.0,
                   mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """`sum_pair weight * distance(student map, teacher map aligned to the student grid)`.

  Args:
    student_maps, teacher_maps: `(B, H, W)` maps keyed by pair name (sizes may differ).
    weights: per-pair weight, same keys.
    method, temperature: normalisation, as in `map_distance`.
    mask: optional `(B,)` example weights.

  Returns:
    `(total, {pair: weight * distance})`.
  """
  if not set(student_maps) == set(teacher_maps) == set(weights):
    raise ValueError(f'pair names differ: student {sorted(student_maps)}, teacher '
                     f'{sorted(teacher_maps)}, weights {sorted(weights)}')
  terms = {}
  for name in sorted(weights):
    s = student_maps[name]
    t = align(teacher_maps[name], s.shape[1:])
    terms[name] = weights[name] * map_distance(s, t, method, temperature, mask)
  total = sum(terms.values(), jnp.zeros((), jnp.float32))
  return total, terms


class ChannelAdapter(nn.Module):
  """A learned 1x1 projection of the last axis, `(..., C_s) -> (..., features)`.

  Maps a student feature map (or tokens) to the teacher's width so that a feature distance
  can be taken; it is trained with the student and is never part of the exported model.
  """

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Dense(self.features, use_bias=self.use_bias, name='proj')(upcast(x))


class ChannelAdapters(nn.Module):
  """One `ChannelAdapter` per name: `{name: (..., C_s)} -> {name: (..., C_t)}`.

  Attributes:
    widths: `((name, output width), ...)`; parameters live under `params[name]['proj']`.
  """

  widths: tuple[tuple[str, int], ...]

  @nn.compact
  def __call__(self, features: Mapping[str, Array]) -> dict[str, Array]:
    return {name: ChannelAdapter(width, name=name)(features[name])
            for name, width in self.widths if name in features}
