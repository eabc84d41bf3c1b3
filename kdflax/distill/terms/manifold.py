"""`manifold`: patch-level manifold relations (intra-image, inter-image, random-sampled).

`weight * sum_pairs pair.weight * (intra_weight intra + inter_weight inter + random_weight
random) / num_pairs`, as in the reference recipe (first 4 + last 4 blocks:
`first_last_pairs`). Tokens of both sides are resized to a common grid (`grid`: 'min'
downsamples the larger, or 'student' / 'teacher'); relations are formed per token, so the
widths may differ. `num_samples` tokens are drawn with the `rng` given to `apply` (pair i, in
sorted name order, uses `fold_in(rng, i)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdflax.distill import attention as attn_lib
from kdflax.distill import manifold as manifold_lib
from kdflax.distill.pairing import Pair, PairTerm
from kdflax.distill.term import Array, Inputs, count, number, one_of

GRIDS = ('min', 'student', 'teacher')


def first_last_pairs(num_teacher_blocks: int, num_student_blocks: int, first: int = 4,
                     last: int = 4, teacher_key: str = 'block{}', student_key: str = 'block{}'
                     ) -> dict[str, dict[str, str]]:
  """Manifold pairs of the reference recipe: the first `first` and last `last` blocks.

  E.g. `first_last_pairs(24, 12)` pairs teacher blocks 0-3, 20-23 with student 0-3, 8-11.
  """
  if first + last > min(num_teacher_blocks, num_student_blocks):
    raise ValueError(f'first + last = {first + last} exceeds the depth of a model '
                     f'({num_teacher_blocks} teacher, {num_student_blocks} student blocks)')
  t_ids = list(range(first)) + list(range(num_teacher_blocks - last, num_teacher_blocks))
  s_ids = list(range(first)) + list(range(num_student_blocks - last, num_student_blocks))
  return {student_key.format(s): {'teacher': teacher_key.format(t),
                                  'student': student_key.format(s)}
          for t, s in zip(t_ids, s_ids, strict=True)}


class ManifoldRelations(PairTerm):
  """Pair keys: teacher, student, weight, teacher_kind, student_kind ('feature' / 'tokens')."""

  name = 'manifold'
  defaults = {'weight': 0.0, 'intra_weight': 4.0, 'inter_weight': 0.1, 'random_weight': 0.2,
              'num_samples': 192, 'grid': 'min', 'pairs': {}}

  @classmethod
  def check(cls, section):
    for key in ('intra_weight', 'inter_weight', 'random_weight'):
      number(f'manifold.{key}', section[key])
    count('manifold.num_samples', section['num_samples'], 1)
    one_of('manifold.grid', section['grid'], GRIDS)

  def pair_options(self, path, config, teacher, student):
    self.reject_window_attention(path, teacher, student)
    return {}

  def matched_shapes(self, s_shape, t_shape):
    return s_shape[:-1] == t_shape[:-1]  # relations are per token: widths may differ

  def target_grid(self, pair: Pair, s, t) -> tuple[int, int]:
    s_grid = tuple(jax.eval_shape(pair.student.features, s).shape[1:3])
    t_grid = tuple(jax.eval_shape(pair.teacher.features, t).shape[1:3])
    return manifold_lib.matched_grid(s_grid, t_grid, self.section['grid'])

  def _tokens(self, pair: Pair, features: Array) -> Array:
    resized = attn_lib.resize_features(features, self.grids[self.key(pair)])
    return resized.reshape(resized.shape[0], -1, resized.shape[-1])

  def student_compared(self, pair: Pair, s: Array) -> Array:
    """`(B, N, C_s)` tokens on the common grid."""
    return self._tokens(pair, pair.student.features(s))

  def teacher_target(self, pair: Pair, t: Array) -> Array:
    """`(B, N, C_t)` tokens on the common grid."""
    return self._tokens(pair, pair.teacher.features(t))

  def __call__(self, x: Inputs) -> dict[str, Array]:
    m = self.section
    num_samples = m['num_samples'] if m['random_weight'] != 0 else 0
    if num_samples and x.rng is None:
      raise ValueError('the manifold loss samples random tokens: apply(..., rng=key) is needed')
    sums = {name: jnp.zeros((), jnp.float32) for name in manifold_lib.TERMS}
    for i, pair in enumerate(self.pairs):
      s = self.student_compared(pair, x.student_intermediates[pair.student.key])
      t = x.targets[self.key(pair)]
      key = jax.random.fold_in(x.rng, i) if num_samples else None
      values = manifold_lib.relation_terms(s, t, key, num_samples, x.mask)
      for name in manifold_lib.TERMS:
        sums[name] = sums[name] + pair.weight * values[name]
    scale = self.weight / len(self.pairs)
    weights = {'intra': m['intra_weight'], 'inter': m['inter_weight'],
               'random': m['random_weight']}
    terms = {f'manifold/{name}': scale * weights[name] * sums[name]
             for name in manifold_lib.TERMS}
    terms['manifold'] = sum(terms.values(), jnp.zeros((), jnp.float32))
    return terms
