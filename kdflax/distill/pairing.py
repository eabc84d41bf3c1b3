"""Pairs of teacher/student intermediates and the terms built on them (attention, manifold).

A pair names one teacher and one student intermediate (`teacher`, `student` keys) and how to
read each (`*_kind`): Swin window attention `(B * nW, heads, N, N)` (per the model's
`ModelLayout`), features `(B, H, W, C)` or tokens `(B, P + N, C)` (prefix tokens dropped,
viewed on the model's token grid). `PairTerm` checks every pair against the models' shapes
when the objective is built, traces what each pair compares with `jax.eval_shape`, and
computes the teacher's side of every pair (`teacher_targets`), aligned to the student.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from kdflax.distill import attention as attn_lib
from kdflax.distill.term import Array, Context, LossTerm, number, one_of

KINDS = ('auto', 'window_attention', 'feature', 'tokens')
PAIR_DEFAULTS = {'teacher': None, 'student': None, 'weight': 1.0, 'teacher_kind': 'auto',
                 'student_kind': 'auto'}


@dataclasses.dataclass(frozen=True)
class Side:
  """One end of a pairing: which tensor, read how."""

  key: str
  kind: str                              # 'window_attention' | 'feature' | 'tokens'
  layout: tuple | None = None            # Swin layout for window attention
  num_prefix_tokens: int = 0
  token_grid: tuple[int, int] | None = None

  def features(self, x: Array) -> Array:
    """`(B, H, W, C)` for feature and tokens kinds."""
    if self.kind == 'tokens':
      return attn_lib.tokens_to_grid(x, self.num_prefix_tokens, self.token_grid)
    return x

  def spatial_map(self, x: Array, p: float) -> Array:
    """`(B, h, w)`: attention received per token, or `mean_c |F|^p` of the features."""
    if self.kind == 'window_attention':
      return attn_lib.window_attention_map(x, self.layout)
    return attn_lib.activation_map(self.features(x), p)

  def batch(self, shape: Sequence[int]) -> int:
    if self.kind == 'window_attention':
      _, _, _, _, n_h, n_w = attn_lib.window_grid(self.layout)
      return shape[0] // (n_h * n_w)
    return shape[0]


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  teacher: Side
  student: Side
  weight: float
  distance: str = 'map'
  adapter: bool = False


def _as_dict(value: Any) -> dict:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return dict(value)


def check_pairs(term: str, pairs: Any, defaults: Mapping[str, Any]) -> dict[str, dict]:
  """A `pairs` config (dict or list) -> `{name: pair with defaults}`; bad entries raise."""
  if isinstance(pairs, (list, tuple)):
    pairs = {f'pair{i}': p for i, p in enumerate(pairs)}
  if not isinstance(pairs, Mapping):
    raise ValueError(f'loss config {term}.pairs must map names to pairs, got {pairs!r}')
  checked = {}
  for name, pair in pairs.items():
    if not re.fullmatch(r'[A-Za-z0-9_-]+', str(name)):
      raise ValueError(f'loss config {term}.pairs: pair name {name!r} must use letters, '
                       f'digits, _ and - only (it names the logged term {term}/<name>)')
    if not isinstance(pair, Mapping) and not isinstance(pair, ml_collections.ConfigDict):
      raise ValueError(f'loss config {term}.pairs.{name} must be a dict with keys '
                       f'{sorted(defaults)}, got {pair!r}')
    pair = _as_dict(pair)
    unknown = sorted(set(pair) - set(defaults))
    if unknown:
      raise ValueError(f'loss config {term}.pairs.{name}: unknown key(s) {unknown}; keys '
                       f'are {sorted(defaults)}')
    for required in ('teacher', 'student'):
      if not isinstance(pair.get(required), str):
        raise ValueError(f'loss config {term}.pairs.{name}.{required} must name an '
                         f'intermediates key, got {pair.get(required)!r}')
    checked[str(name)] = {**defaults, **pair}
  return checked


def resolve_side(context: Context, path: str, role: str, key: str, kind: str) -> Side:
  """How pair `path` reads intermediate `key` of the `role` model; errors name `path`."""
  shapes = context.teacher_shapes if role == 'teacher' else context.student_shapes
  layout = context.teacher_layout if role == 'teacher' else context.student_layout
  if key not in shapes:
    raise ValueError(f'loss config {path}.{role}: {key!r} is not a {role} intermediate; '
                     f'available: {sorted(shapes)}')
  shape = shapes[key]
  one_of(f'{path}.{role}_kind', kind, KINDS)
  if kind == 'auto':
    if key in layout.window_attention:
      kind = 'window_attention'
    elif len(shape) == 3:
      kind = 'tokens'
    elif len(shape) == 4:
      kind = 'feature'
    else:
      raise ValueError(f'loss config {path}.{role}: {role} intermediate {key!r} has shape '
                       f'{shape}; expected (B, H, W, C) features, (B, P + N, C) tokens or '
                       f'window attention listed in {role}_layout.window_attention')
  where = f'loss config {path}.{role} ({role} intermediate {key!r}, shape {shape})'
  if kind == 'window_attention':
    if key not in layout.window_attention:
      raise ValueError(f'{where}: window attention needs its (height, width, window, shift) '
                       f'in {role}_layout.window_attention[{key!r}]')
    error = attn_lib.window_attention_shape_error(shape, layout.window_attention[key])
    if error:
      raise ValueError(f'{where}: {error}')
    return Side(key, kind, layout=tuple(layout.window_attention[key]))
  if kind == 'feature':
    if len(shape) != 4:
      raise ValueError(f'{where}: kind feature needs (B, H, W, C)')
    return Side(key, kind)
  if len(shape) != 3:
    raise ValueError(f'{where}: kind tokens needs (B, P + N, C)')
  prefix = layout.num_prefix_tokens
  if not 0 <= prefix < shape[1]:
    raise ValueError(f'{where}: {role}_layout.num_prefix_tokens = {prefix} leaves no patch '
                     f'tokens')
  try:
    grid = attn_lib.token_grid(shape[1] - prefix, layout.token_grid)
  except ValueError as e:
    raise ValueError(f'{where}: after {prefix} prefix tokens, {e} '
                     f'({role}_layout.token_grid)') from None
  return Side(key, kind, num_prefix_tokens=prefix, token_grid=grid)


class PairTerm(LossTerm):
  """A term over configured pairs; subclasses say how each pair is compared.

  Subclasses implement `pair_options` (extra per-pair keys and checks), `target_grid`,
  `student_compared`, `teacher_target` and `__call__`.
  """

  pair_defaults: ClassVar[Mapping[str, Any]] = PAIR_DEFAULTS

  def __init__(self, section, context):
    super().__init__(section, context)
    if not section['pairs']:
      raise ValueError(f'loss config {self.name}.weight is {section["weight"]} but '
                       f'{self.name}.pairs is empty')
    self.pairs = tuple(self._build(name, pc) for name, pc in sorted(section['pairs'].items()))
    self.grids: dict[str, tuple[int, int]] = {}
    self._compared = self._trace()

  def pair_options(self, path: str, config: Mapping[str, Any], teacher: Side, student: Side
                   ) -> dict[str, Any]:
    """Checks a pair's term-specific keys; returns `Pair` fields (distance, adapter)."""
    return {}

  def target_grid(self, pair: Pair, s: Any, t: Any) -> tuple[int, int]:
    raise NotImplementedError

  def student_compared(self, pair: Pair, s: Array) -> Array:
    raise NotImplementedError

  def teacher_target(self, pair: Pair, t: Array) -> Array:
    raise NotImplementedError

  def key(self, pair: Pair) -> str:
    return f'{self.name}/{pair.name}'

  def _build(self, name: str, pc: Mapping[str, Any]) -> Pair:
    path = f'{self.name}.pairs.{name}'
    weight = number(f'{path}.weight', pc['weight'])
    teacher = resolve_side(self.context, path, 'teacher', pc['teacher'], pc['teacher_kind'])
    student = resolve_side(self.context, path, 'student', pc['student'], pc['student_kind'])
    t_batch = teacher.batch(self.context.teacher_shapes[teacher.key])
    s_batch = student.batch(self.context.student_shapes[student.key])
    if t_batch != s_batch:
      raise ValueError(f'loss config {path}: teacher {teacher.key!r} has batch {t_batch} '
                       f'but student {student.key!r} has batch {s_batch}')
    options = self.pair_options(path, pc, teacher, student)
    return Pair(name, teacher, student, weight, **options)

  def reject_window_attention(self, path: str, *sides: Side) -> None:
    """Window attention has no tokens: features or tokens are needed here."""
    for side in sides:
      if side.kind == 'window_attention':
        raise ValueError(f'loss config {path}: {side.key!r} is window attention, which '
                         f'has no tokens; {self.name} pairs need features or tokens')

  def matched_shapes(self, s_shape: tuple, t_shape: tuple) -> bool:
    return s_shape == t_shape

  def _trace(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Shapes of what each pair compares (student, teacher), by abstract evaluation; also
    fixes `self.grids`, the `(h, w)` each pair's teacher target is resized to."""
    out = {}
    for pair in self.pairs:
      key = self.key(pair)
      s = jax.ShapeDtypeStruct(self.context.student_shapes[pair.student.key], jnp.float32)
      t = jax.ShapeDtypeStruct(self.context.teacher_shapes[pair.teacher.key], jnp.float32)
      try:
        self.grids[key] = self.target_grid(pair, s, t)
        s_out, t_out = jax.eval_shape(
            lambda a, b, p=pair: (self.student_compared(p, a), self.teacher_target(p, b)),
            s, t)
      except (ValueError, TypeError) as e:
        raise ValueError(f'loss config {self.name}.pairs.{pair.name}: cannot align '
                         f'{pair.student.key!r} with {pair.teacher.key!r}: {e}') from None
      s_shape, t_shape = tuple(s_out.shape), tuple(t_out.shape)
      if pair.adapter:
        s_shape = s_shape[:-1] + (t_shape[-1],)
      if not self.matched_shapes(s_shape, t_shape):
        raise ValueError(f'loss config {self.name}.pairs.{pair.name}: student {s_shape} and '
                         f'teacher {t_shape} do not match after alignment')
      out[key] = (s_shape, t_shape)
    return out

  @property
  def compared_shapes(self):
    return dict(self._compared)

  def teacher_keys(self) -> set[str]:
    return {p.teacher.key for p in self.pairs}

  def student_keys(self) -> set[str]:
    return {p.student.key for p in self.pairs}

  def teacher_targets(self, teacher):
    return {self.key(p): self.teacher_target(p, teacher[p.teacher.key]) for p in self.pairs}
