"""The distillation objective: a configured, weighted sum of losses, plus learned adapters.

    obj = Objective(config, teacher_shapes, student_shapes,
                    teacher_layout={'window_attention': {'stage3_attn': (12, 12, 12, 0)}},
                    student_layout=None)
    adapter_params = obj.init(jax.random.key(0))          # {} when no pair uses an adapter
    loss, terms = obj.apply(adapter_params, student_logits, student_intermediates,
                            teacher_logits, teacher_intermediates, labels,
                            step=step, rng=rng, mask=mask)

`teacher_shapes` / `student_shapes` are the `'intermediates'` dicts of each model as
`jax.eval_shape` gives them (`{'stage0': (ShapeDtypeStruct,), ...}`; bare values and a dict
wrapped as `{'intermediates': {...}}` are accepted too). Every pairing is checked against them
when the objective is built, so a bad configuration fails there with a message naming the
config key, never inside `jit`. Shapes are checked again (all but the batch size) on every
call. `adapter_params` are trained with the student (put them in the optimiser's tree) and
are never exported. Teacher logits and intermediates are wrapped in `stop_gradient`.

The teacher side of every pair is computed by `teacher_targets(teacher_intermediates)` (the
teacher's map, features or tokens already aligned to the student's grid, `target_shapes` per
example); `apply(..., teacher_targets=targets)` takes those instead of the intermediates and
gives the same loss, which is what a teacher-output cache (`kdflax.train.teacher_cache`)
stores.

`apply` returns the total and a dict of every active weighted term: `ce`, `kd`, `dkd`, `hard`,
`attention` (with `attention/<pair>`), `manifold` (with `manifold/intra`, `manifold/inter`,
`manifold/random`) and `total`. A term is active when its `weight` is nonzero.

The terms and their options (`default_loss_config()`, each `weight` multiplying its whole
term) are the registered `LossTerm`s of `kdflax.distill.terms`, one file each: `ce.py`
(label smoothing, which logits), `kd.py` (temperature), `dkd.py` (alpha, beta, temperature,
warm-up), `hard.py` (DeiT hard distillation, distillation token), `attention.py` (pairs of
maps or features, p, normalisation, adapters) and `manifold.py` (patch-level relations). Pairs
(`teacher`, `student` intermediates keys, `weight`, `teacher_kind` / `student_kind`: 'auto',
'window_attention', 'feature' or 'tokens') are read as `kdflax.distill.pairing` describes: a
`(B, P + N, C)` tokens tensor drops the model's `num_prefix_tokens` first and is viewed as the
model's `token_grid` (or a square). Multi-teacher: pass a list of teacher logits to `apply`;
logit terms then use the average of the teachers' probabilities (hard: their argmax);
intermediates come from one teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdflax.distill import attention as attn_lib
from kdflax.distill.pairing import KINDS, PairTerm, check_pairs
from kdflax.distill.term import Context, Inputs, LossTerm, number
from kdflax.distill.terms import TERMS
from kdflax.distill.terms.attention import DISTANCES
from kdflax.distill.terms.manifold import GRIDS, first_last_pairs
from kdflax.models.layout import ModelLayout

__all__ = ['DISTANCES', 'GRIDS', 'KINDS', 'TERMS', 'Objective', 'default_loss_config',
           'first_last_pairs', 'pair_defaults']

Array = jax.Array
_BY_NAME: dict[str, type[LossTerm]] = {t.name: t for t in TERMS}


def default_loss_config() -> ml_collections.ConfigDict:
  """The loss schema with its defaults (plain cross-entropy): each term's `defaults`."""
  return ml_collections.ConfigDict({t.name: dict(t.defaults) for t in TERMS})


def pair_defaults(term: str) -> dict[str, Any] | None:
  """The keys and defaults of one pair of `term` (None for a term without pairs)."""
  cls = _BY_NAME[term]
  return dict(cls.pair_defaults) if issubclass(cls, PairTerm) else None


def _checked_layout(layout: ModelLayout | Mapping[str, Any] | None, role: str) -> ModelLayout:
  out = ModelLayout.create(layout, role)
  for key, value in out.window_attention.items():
    try:
      attn_lib.window_grid(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f'{role}_layout.window_attention[{key!r}]: {e}') from None
  return out


def _unwrap_value(value: Any) -> Any:
  if isinstance(value, tuple) and len(value) == 1:
    return value[0]
  return value


def _unwrap(tree: Mapping[str, Any] | None) -> dict[str, Any]:
  """`{'key': (x,)}` (as sown) -> `{'key': x}`; also unwraps `{'intermediates': {...}}`."""
  if tree is None:
    return {}
  tree = dict(tree)
  if set(tree) == {'intermediates'} and isinstance(tree['intermediates'], Mapping):
    tree = dict(tree['intermediates'])
  return {k: _unwrap_value(v) for k, v in tree.items()}


def _as_dict(value: Any) -> dict:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return dict(value)


def _check_schema(config: Mapping[str, Any]) -> dict:
  """The config as plain dicts, with defaults filled in; unknown keys and bad values raise."""
  config = _as_dict(config)
  unknown = sorted(set(config) - set(_BY_NAME))
  if unknown:
    raise ValueError(f'loss config: unknown term(s) {unknown}; terms are {sorted(_BY_NAME)}')
  out = {}
  for name, cls in _BY_NAME.items():
    section = _as_dict(config.get(name, {}))
    unknown = sorted(set(section) - set(cls.defaults))
    if unknown:
      raise ValueError(f'loss config {name}: unknown key(s) {unknown}; keys are '
                       f'{sorted(cls.defaults)}')
    out[name] = {**cls.defaults, **section}
    if issubclass(cls, PairTerm):
      out[name]['pairs'] = check_pairs(name, out[name]['pairs'], cls.pair_defaults)
  for name in _BY_NAME:
    number(f'{name}.weight', out[name]['weight'])
  for name, cls in _BY_NAME.items():
    cls.check(out[name])
  return out


class Objective:
  """The total distillation loss for one teacher/student pair of intermediates layouts.

  Args:
    config: a loss `ConfigDict` (or dict) following `default_loss_config()`; missing keys take
      their defaults.
    teacher_shapes, student_shapes: each model's intermediates as `jax.eval_shape` gives them
      (`{key: (ShapeDtypeStruct,)}`); only the keys used by the config are read. May be
      None / empty when no pairing reads them.
    teacher_layout, student_layout: `ModelLayout` or a dict of its fields.

  Attributes:
    config: the checked config (plain dicts, defaults filled in).
    terms: `name -> LossTerm` of the active terms (nonzero weight), in `TERMS` order.
    attention_pairs, manifold_pairs: the built pairs of those terms (`()` when inactive).
    compared_shapes: `'<term>/<pair>'` -> (student, teacher) shapes each pair compares.

  Raises:
    ValueError: a config value out of range, an unknown key, or a pairing that cannot be
      aligned, naming the config key.
  """

  def __init__(self, config: Mapping[str, Any], teacher_shapes: Mapping[str, Any] | None,
               student_shapes: Mapping[str, Any] | None,
               teacher_layout: ModelLayout | Mapping[str, Any] | None = None,
               student_layout: ModelLayout | Mapping[str, Any] | None = None):
    self.config = _check_schema(config)
    self.teacher_shapes = {k: tuple(v.shape) for k, v in _unwrap(teacher_shapes).items()}
    self.student_shapes = {k: tuple(v.shape) for k, v in _unwrap(student_shapes).items()}
    context = Context(self.teacher_shapes, self.student_shapes,
                      _checked_layout(teacher_layout, 'teacher'),
                      _checked_layout(student_layout, 'student'))
    self.teacher_layout, self.student_layout = context.teacher_layout, context.student_layout
    self.terms: dict[str, LossTerm] = {
        name: cls(self.config[name], context) for name, cls in _BY_NAME.items()
        if self.active(name)}
    self.compared_shapes = {k: v for t in self.terms.values()
                            for k, v in t.compared_shapes.items()}

  def active(self, term: str) -> bool:
    """Whether `term` (a `TERMS` name) contributes to the loss."""
    return self.config[term]['weight'] != 0

  def _pairs(self, term: str) -> tuple:
    built = self.terms.get(term)
    return built.pairs if isinstance(built, PairTerm) else ()

  @property
  def attention_pairs(self) -> tuple:
    return self._pairs('attention')

  @property
  def manifold_pairs(self) -> tuple:
    return self._pairs('manifold')

  @property
  def target_shapes(self) -> dict[str, tuple[int, ...]]:
    """`'attention/<pair>'` / `'manifold/<pair>'` -> per-example shape of its teacher target."""
    return {key: t_shape[1:] for key, (_, t_shape) in self.compared_shapes.items()}

  def _check_call_shapes(self, role: str, tree: dict[str, Any], keys: set[str]) -> None:
    expected = self.teacher_shapes if role == 'teacher' else self.student_shapes
    for key in sorted(keys):
      if key not in tree:
        raise ValueError(f'{role} intermediates lack {key!r} (configured pairs need it); '
                         f'got {sorted(tree)}')
      got, want = tuple(tree[key].shape), expected[key]
      if got[1:] != want[1:] or len(got) != len(want):
        raise ValueError(f'{role} intermediate {key!r} has shape {got}; the objective was '
                         f'built for {want} (only the batch size may differ)')

  def teacher_targets(self, teacher_intermediates: Mapping[str, Any] | None
                      ) -> dict[str, Array]:
    """Everything the pairs read from the teacher, per pair, already aligned to the student.

    Args:
      teacher_intermediates: the teacher's `'intermediates'` (values as sown, 1-tuples).

    Returns:
      `{'attention/<pair>': (B, h, w) or (B, h, w, C_t), 'manifold/<pair>': (B, N, C_t)}`
      (`target_shapes` per example): what `apply(..., teacher_targets=...)` takes instead of
      the intermediates, giving the same loss (a teacher-output cache stores these).
    """
    t_int = _unwrap(teacher_intermediates)
    self._check_call_shapes('teacher', t_int,
                            set().union(*(t.teacher_keys() for t in self.terms.values())))
    return {k: v for t in self.terms.values() for k, v in t.teacher_targets(t_int).items()}

  def attention_maps(self, student_intermediates: Mapping[str, Any],
                     teacher_intermediates: Mapping[str, Any]) -> dict[str, tuple[Array, Array]]:
    """The maps the attention term compares, per map-distance pair (for pictures).

    Returns:
      `{pair name: (student (B, h, w), teacher (B, h, w))}`, the teacher's already aligned to
      the student's grid, both before normalisation (`{}` when the term is inactive).
    """
    if 'attention' not in self.terms:
      return {}
    return self.terms['attention'].maps(_unwrap(student_intermediates),
                                        self.teacher_targets(teacher_intermediates))

  def init(self, rng: Array) -> dict:
    """Trained parameters of the terms (adapters; `{}` when no pair uses an adapter)."""
    params: dict[str, Any] = {}
    for term in self.terms.values():
      params.update(term.init(rng))
    return params

  def _targets(self, teacher_intermediates, teacher_targets) -> dict[str, Array]:
    if teacher_targets is None:
      uses_pairs = any(isinstance(t, PairTerm) for t in self.terms.values())
      return self.teacher_targets(teacher_intermediates) if uses_pairs else {}
    targets = dict(teacher_targets)
    for key, shape in self.target_shapes.items():
      if key not in targets:
        raise ValueError(f'teacher_targets lack {key!r} (configured pairs need it); '
                         f'got {sorted(targets)}')
      if tuple(targets[key].shape[1:]) != shape:
        raise ValueError(f'teacher target {key!r} has shape {tuple(targets[key].shape)}; '
                         f'the objective needs (batch, {", ".join(map(str, shape))})')
    return targets

  def apply(self, adapter_params: Mapping[str, Any], student_logits: Array,
            student_intermediates: Mapping[str, Any] | None,
            teacher_logits: Array | Sequence[Array] | None,
            teacher_intermediates: Mapping[str, Any] | None, labels: Array, *,
            step: Array | int | None = None, rng: Array | None = None,
            mask: Array | None = None, soft_labels: Array | None = None,
            teacher_targets: Mapping[str, Array] | None = None
            ) -> tuple[Array, dict[str, Array]]:
    """The total loss and every active weighted term.

    Args:
      adapter_params: from `init` (trained with the student).
      student_logits: `(B, K)` returned by the student.
      student_intermediates: the student's `'intermediates'` (values as sown, 1-tuples).
      teacher_logits: `(B, K)`, or a list of them (multi-teacher); None if no term needs it.
      teacher_intermediates: the teacher's `'intermediates'`.
      labels: `(B,)` integer labels.
      step: training step, for the DKD warm-up.
      rng: PRNG key for the manifold loss's random token sample (pair i, in sorted name
        order, uses `fold_in(rng, i)`); needed when the manifold term is active.
      mask: optional `(B,)` example weights (0 for padding).
      soft_labels: optional `(B, K)` targets (mixup/CutMix) for the cross-entropy term; the
        other terms keep the integer `labels`.
      teacher_targets: optional `teacher_targets(...)` output (e.g. read from a teacher
        cache), used instead of `teacher_intermediates` (which may then be None).

    Returns:
      `(total, terms)`: a float32 scalar and `{term: weighted value}` including `'total'`.
    """
    s_int = _unwrap(student_intermediates)
    if teacher_logits is not None:
      teacher_logits = jax.tree.map(jax.lax.stop_gradient, teacher_logits)
      if isinstance(teacher_logits, list):
        teacher_logits = tuple(teacher_logits)
    if teacher_logits is None and any(t.uses_teacher_logits for t in self.terms.values()):
      raise ValueError('teacher_logits is None but kd, dkd or hard is active')
    self._check_call_shapes('student', s_int,
                            set().union(*(t.student_keys() for t in self.terms.values())))
    targets = jax.tree.map(jax.lax.stop_gradient,
                           self._targets(teacher_intermediates, teacher_targets))
    inputs = Inputs(student_logits, s_int, teacher_logits, targets, labels, soft_labels, mask,
                    step, rng, dict(adapter_params))
    terms: dict[str, Array] = {}
    for term in self.terms.values():
      terms.update(term(inputs))
    top = [v for k, v in terms.items() if '/' not in k]
    total = sum(top[1:], top[0]) if top else jnp.zeros((), jnp.float32)
    terms['total'] = total
    return total, terms
