"""`attention`: teacher attention / feature maps matched by the student, pair by pair.

Each pair compares either spatial maps (`distance='map'`: Swin window attention -> attention
received per token, features and tokens -> `mean_c |F|^p`; the teacher's map resized to the
student's grid, then `normalize`d: 'l2' attention transfer or 'softmax' KL) or raw features
(`distance='feature'`: mean squared error after resizing the teacher to the student grid;
unequal widths need a learned 1x1 `adapter` student width -> teacher width, trained with the
student and never exported). The term is `weight * sum_pairs pair.weight * distance`, with
every pair logged as `attention/<pair>`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdflax.distill import attention as attn_lib
from kdflax.distill import losses
from kdflax.distill.pairing import PAIR_DEFAULTS, Pair, PairTerm, Side
from kdflax.distill.term import Array, Inputs, number, one_of

DISTANCES = ('map', 'feature')


class AttentionTransfer(PairTerm):
  """Pair keys: teacher, student, weight, teacher_kind, student_kind, distance, adapter."""

  name = 'attention'
  defaults = {'weight': 0.0, 'p': 2.0, 'normalize': 'l2', 'temperature': 1.0, 'pairs': {}}
  pair_defaults = {**PAIR_DEFAULTS, 'distance': 'map', 'adapter': False}

  @classmethod
  def check(cls, section):
    number('attention.p', section['p'], 0.0, strict=True)
    number('attention.temperature', section['temperature'], 0.0, strict=True)
    one_of('attention.normalize', section['normalize'], attn_lib.NORMALIZATIONS)

  def __init__(self, section, context):
    super().__init__(section, context)
    widths = tuple((p.name, context.teacher_shapes[p.teacher.key][-1])
                   for p in self.pairs if p.adapter)
    self._adapter_inputs = {p.name: context.student_shapes[p.student.key][-1]
                            for p in self.pairs if p.adapter}
    self.adapters = attn_lib.ChannelAdapters(widths) if widths else None

  def pair_options(self, path, config, teacher: Side, student: Side) -> dict[str, Any]:
    distance, adapter = config['distance'], config['adapter']
    one_of(f'{path}.distance', distance, DISTANCES)
    if not isinstance(adapter, bool):
      raise ValueError(f'loss config {path}.adapter must be true or false, got {adapter!r}')
    if adapter and distance != 'feature':
      raise ValueError(f"loss config {path}.adapter applies to distance 'feature' only")
    if distance == 'feature':
      self.reject_window_attention(path, teacher, student)
      c_t = self.context.teacher_shapes[teacher.key][-1]
      c_s = self.context.student_shapes[student.key][-1]
      if c_t != c_s and not adapter:
        raise ValueError(f'loss config {path}: feature distance between student width '
                         f'{c_s} ({student.key!r}) and teacher width {c_t} '
                         f'({teacher.key!r}) needs adapter=True')
    return {'distance': distance, 'adapter': adapter}

  def target_grid(self, pair: Pair, s, t) -> tuple[int, int]:
    if pair.distance == 'map':
      p = self.section['p']
      return tuple(jax.eval_shape(lambda x: pair.student.spatial_map(x, p), s).shape[1:3])
    return tuple(jax.eval_shape(pair.student.features, s).shape[1:3])

  def student_compared(self, pair: Pair, s: Array) -> Array:
    """`(B, h, w)` map or `(B, h, w, C_s)` features (before the adapter)."""
    if pair.distance == 'map':
      return pair.student.spatial_map(s, self.section['p'])
    return pair.student.features(s)

  def teacher_target(self, pair: Pair, t: Array) -> Array:
    """`(B, h, w)` map or `(B, h, w, C_t)` features on the student's grid."""
    grid = self.grids[self.key(pair)]
    if pair.distance == 'map':
      return attn_lib.align(pair.teacher.spatial_map(t, self.section['p']), grid)
    return attn_lib.resize_features(pair.teacher.features(t), grid)

  def maps(self, student: dict, targets: dict) -> dict[str, tuple[Array, Array]]:
    """`{pair: (student map, teacher map)}` of the map-distance pairs (before normalising)."""
    return {p.name: (self.student_compared(p, student[p.student.key]), targets[self.key(p)])
            for p in self.pairs if p.distance == 'map'}

  def init(self, rng: Array) -> dict[str, Any]:
    """The adapters' parameters, one entry per adapter pair (`{}` without adapters)."""
    if self.adapters is None:
      return {}
    dummy = {name: jnp.zeros((1, c), jnp.float32) for name, c in self._adapter_inputs.items()}
    return dict(self.adapters.init(rng, dummy)['params'])

  def __call__(self, x: Inputs) -> dict[str, Array]:
    a = self.section
    compared = {p.name: (self.student_compared(p, x.student_intermediates[p.student.key]),
                         x.targets[self.key(p)]) for p in self.pairs}
    adapted = {}
    if self.adapters is not None:
      adapted = self.adapters.apply({'params': x.params},
                                    {p.name: compared[p.name][0] for p in self.pairs
                                     if p.adapter})
    map_s, map_t, map_w, terms = {}, {}, {}, {}
    for pair in self.pairs:
      s, t = compared[pair.name]
      if pair.distance == 'map':
        map_s[pair.name], map_t[pair.name] = s, t
        map_w[pair.name] = self.weight * pair.weight
        continue
      diff = losses.upcast(adapted.get(pair.name, s)) - losses.upcast(t)
      per_example = jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim)))
      terms[f'attention/{pair.name}'] = (self.weight * pair.weight
                                         * losses.masked_mean(per_example, x.mask))
    if map_s:
      _, map_terms = attn_lib.attention_loss(map_s, map_t, map_w, a['normalize'],
                                             a['temperature'], x.mask)
      terms.update({f'attention/{k}': v for k, v in map_terms.items()})
    terms = dict(sorted(terms.items()))
    values = list(terms.values())
    terms['attention'] = sum(values[1:], values[0])
    return terms


