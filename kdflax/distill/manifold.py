"""Fine-grained manifold distillation (Hao et al., 2022): patch-relation losses.

Tokens `F` `(B, N, C)` (a CNN or Swin stage `(B, H, W, C)` is `H * W` tokens) are
L2-normalised over channels, `f = F / ||F||`, and three relation matrices are compared between
student and teacher. A relation matrix holds cosine similarities, so the channel widths of
student and teacher never need to match. Each term is a mean squared error:

    intra  = 1 / (B N^2) * sum_b ||f_s[b] f_s[b]^T - f_t[b] f_t[b]^T||_F^2       (N x N per image)
    inter  = 1 / (N B^2) * sum_n ||f_s[:, n] f_s[:, n]^T - f_t[:, n] f_t[:, n]^T||_F^2
                                                                (B x B per token position)
    random = 1 / K^2 * ||g_s g_s^T - g_t g_t^T||_F^2,   g = rows idx of f reshaped (B N, C)
                                                                (K x K over pooled tokens)

`idx` is `K` distinct indices into the `B * N` pooled tokens (a prefix of a permutation drawn
from an explicit PRNG key; all of them when `K >= B N`), the same for student and teacher.
These are the means of the reference implementation (`(M_t - M_s).pow(2).mean()`). With a
`mask` `(B,)`, images are weighted by `mask_b` in `intra`, pairs `(b, b')` by
`mask_b * mask_b'` in `inter` and `random`, and each mean is taken over the weights.

When student and teacher token counts differ, both are viewed as grids (square, or the grids
given) and the larger one is area-downsampled to the smaller (or both resized to `grid`) with
`attention.resize_features` before normalisation.

The reference recipe (DeiT-Tiny from CaiT-S24) weights the terms `w_patch = 4` (intra),
`w_sample = 0.1` (inter), `w_rand = 0.2` (random), K = 192, and averages over the paired layers
(first 4 and last 4 blocks); `kdflax.distill.objective` uses these as its defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdflax.distill.attention import resize_features, token_grid
from kdflax.distill.losses import upcast

Array = jax.Array
Grid = tuple[int, int]

TERMS = ('intra', 'inter', 'random')


def _unit(x: Array) -> Array:
  x = upcast(x)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def as_grid(tokens: Array, grid: Sequence[int] | None = None) -> Array:
  """`(B, H, W, C)` stays; `(B, N, C)` becomes `(B, h, w, C)` (square, or the given grid)."""
  if tokens.ndim == 4:
    if grid is not None and tuple(grid) != tuple(tokens.shape[1:3]):
      raise ValueError(f'grid {tuple(grid)} given for features of shape {tokens.shape}')
    return tokens
  if tokens.ndim != 3:
    raise ValueError(f'tokens must be (B, N, C) or (B, H, W, C), got shape {tokens.shape}')
  h, w = token_grid(tokens.shape[1], grid)
  return tokens.reshape(tokens.shape[0], h, w, tokens.shape[2])


def matched_grid(student_grid: Grid, teacher_grid: Grid, grid: Sequence[int] | str | None
                 ) -> Grid:
  """The common token grid: `grid` if a pair, else the student's, the teacher's, or the
  smaller of the two (`'min'` or None: the larger one is downsampled)."""
  if grid is None or grid == 'min':
    return min(student_grid, teacher_grid, key=lambda g: (g[0] * g[1], g))
  if grid == 'student':
    return tuple(student_grid)
  if grid == 'teacher':
    return tuple(teacher_grid)
  if isinstance(grid, str):
    raise ValueError(f"grid must be 'min', 'student', 'teacher' or (h, w), got {grid!r}")
  h, w = (int(v) for v in grid)
  return h, w


def match_tokens(student_tokens: Array, teacher_tokens: Array, *,
                 student_grid: Sequence[int] | None = None,
                 teacher_grid: Sequence[int] | None = None,
                 grid: Sequence[int] | str | None = None) -> tuple[Array, Array]:
  """Both token sets as `(B, N, C_*)` with one token count, resized on their grids if needed."""
  if student_tokens.shape[0] != teacher_tokens.shape[0]:
    raise ValueError(f'batch sizes differ: student {student_tokens.shape}, '
                     f'teacher {teacher_tokens.shape}')
  plain = (student_tokens.ndim == teacher_tokens.ndim == 3 and grid is None
           and student_tokens.shape[1] == teacher_tokens.shape[1])
  if plain:
    return student_tokens, teacher_tokens
  s = as_grid(student_tokens, student_grid)
  t = as_grid(teacher_tokens, teacher_grid)
  target = matched_grid(s.shape[1:3], t.shape[1:3], grid)
  s, t = resize_features(s, target), resize_features(t, target)
  flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
  return flat(s), flat(t)


def _sq_frobenius_of_difference(a: Array, b: Array, method: str = 'auto') -> Array:
  """`||a a^T - b b^T||_F^2` over the last two axes for `(..., n, c_a)` and `(..., n, c_b)`.

  `direct` forms the `n x n` relations; `gram` uses the identity
  `||a a^T - b b^T||^2 = ||a^T a||^2 - 2 ||a^T b||^2 + ||b^T b||^2`, which costs
  `n (c_a + c_b)^2` instead of `n^2 (c_a + c_b)` and never holds an `n x n` matrix; `auto`
  picks the cheaper.
  """
  n, c_a, c_b = a.shape[-2], a.shape[-1], b.shape[-1]
  if method == 'auto':
    method = 'gram' if c_a * c_a + c_a * c_b + c_b * c_b < n * (c_a + c_b) else 'direct'
  hp = jax.lax.Precision.HIGHEST
  if method == 'direct':
    diff = (jnp.einsum('...ic,...jc->...ij', a, a, precision=hp)
            - jnp.einsum('...ic,...jc->...ij', b, b, precision=hp))
    return jnp.sum(diff * diff, axis=(-1, -2))
  if method == 'gram':
    sq = lambda x, y: jnp.sum(jnp.square(jnp.einsum('...ni,...nj->...ij', x, y, precision=hp)),
                              axis=(-1, -2))
    return jnp.maximum(sq(a, a) - 2.0 * sq(a, b) + sq(b, b), 0.0)
  raise ValueError(f"method must be 'auto', 'direct' or 'gram', got {method!r}")


def relation_terms(student_tokens: Array, teacher_tokens: Array, key: Array | None,
                   num_samples: int, mask: Array | None = None,
                   method: str = 'auto') -> dict[str, Array]:
  """The three unweighted terms for `(B, N, C_s)` / `(B, N, C_t)` tokens of one count `N`.

  `key` may be None when `num_samples` is 0 (the `random` term is then 0).
  """
  if student_tokens.shape[:2] != teacher_tokens.shape[:2]:
    raise ValueError(f'token sets must share (B, N), got {student_tokens.shape} and '
                     f'{teacher_tokens.shape}')
  s, t = _unit(student_tokens), _unit(teacher_tokens)
  batch, n = s.shape[:2]
  m = jnp.ones((batch,), s.dtype) if mask is None else jnp.asarray(mask, s.dtype)
  if m.shape != (batch,):
    raise ValueError(f'mask must have shape ({batch},), got {m.shape}')
  hp = jax.lax.Precision.HIGHEST

  intra = _sq_frobenius_of_difference(s, t, method) / (n * n)            # (B,)
  intra = jnp.sum(m * intra) / jnp.maximum(jnp.sum(m), 1.0)

  s_n, t_n = s.transpose(1, 0, 2), t.transpose(1, 0, 2)                   # (N, B, C)
  pair_w = m[:, None] * m[None, :]
  diff = (jnp.einsum('nic,njc->nij', s_n, s_n, precision=hp)
          - jnp.einsum('nic,njc->nij', t_n, t_n, precision=hp))
  inter = jnp.sum(diff * diff * pair_w) / (n * jnp.maximum(jnp.sum(pair_w), 1.0))

  k = min(int(num_samples), batch * n)
  if k <= 0:
    random = jnp.zeros((), s.dtype)
  else:
    if key is None:
      raise ValueError('the random-sampled manifold term needs a PRNG key')
    idx = jax.random.permutation(key, batch * n)[:k]
    g_s = s.reshape(batch * n, -1)[idx]
    g_t = t.reshape(batch * n, -1)[idx]
    w = m[idx // n]
    w = w[:, None] * w[None, :]
    diff = (jnp.einsum('ic,jc->ij', g_s, g_s, precision=hp)
            - jnp.einsum('ic,jc->ij', g_t, g_t, precision=hp))
    random = jnp.sum(diff * diff * w) / jnp.maximum(jnp.sum(w), 1.0)
  return {'intra': intra, 'inter': inter, 'random': random}


def manifold_terms(student_tokens: Array, teacher_tokens: Array, key: Array | None,
                   num_samples: int = 192, *, mask: Array | None = None,
                   student_grid: Sequence[int] | None = None,
                   teacher_grid: Sequence[int] | None = None,
                   grid: Sequence[int] | str | None = None) -> dict[str, Array]:
  """Unweighted manifold terms `{'intra', 'inter', 'random'}` (scalars; see module docstring).

  Args:
    student_tokens: `(B, N_s, C_s)` tokens (prefix tokens already dropped) or `(B, H, W, C_s)`.
    teacher_tokens: `(B, N_t, C_t)` or `(B, H, W, C_t)`; widths may differ from the student's.
    key: PRNG key for the `K` random token indices (shared by student and teacher).
    num_samples: `K`.
    mask: optional `(B,)` example weights.
    student_grid, teacher_grid: `(h, w)` of `(B, N, C)` tokens whose count is not a square.
    grid: the common grid when the counts differ: `'min'` (default), `'student'`,
      `'teacher'` or `(h, w)`.
  """
  s, t = match_tokens(student_tokens, teacher_tokens, student_grid=student_grid,
                      teacher_grid=teacher_grid, grid=grid)
  return relation_terms(s, t, key, num_samples, mask)
