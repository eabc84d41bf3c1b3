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

Configuration reference (`default_loss_config()`; each `weight` multiplies its whole term):

    ce.weight            1.0   cross-entropy against the labels
    ce.label_smoothing   0.0   eps: targets (1 - eps) onehot + eps / K
    ce.logits            'logits'  which student logits: 'logits' (what the model returns) or a
                                   student intermediates key holding (B, K), e.g. 'cls_logits'
    kd.weight            0.0   T^2 KL(softmax(t / T) || softmax(s / T)), batch mean
    kd.temperature       4.0   T
    kd.logits            'logits'  e.g. 'dist_logits' for DeiT soft distillation
    dkd.weight           0.0   decoupled KD: warmup * T^2 (alpha TCKD + beta NCKD)
    dkd.alpha            1.0   target-class part
    dkd.beta             8.0   non-target-class part
    dkd.temperature      4.0   T
    dkd.warmup_steps     0     scale by min(step / warmup_steps, 1); needs `step=` when > 0
    dkd.logits           'logits'
    hard.weight          0.0   DeiT hard distillation: CE against the teacher's argmax
    hard.logits          'logits'
    hard.distillation_token  False  True: 0.5 CE(cls_logits, labels) + 0.5 CE(dist_logits,
                                    argmax teacher), reading the student intermediates
                                    'cls_logits' and 'dist_logits' (set ce.weight to 0 then)
    hard.label_smoothing 0.0   smoothing of the label half in the distillation-token form
    attention.weight     0.0   multiplies the sum of the pairs' weighted distances
    attention.p          2.0   activation maps are mean_c |F|^p
    attention.normalize  'l2'  'l2': mean squared difference of L2-normalised maps (attention
                               transfer); 'softmax': KL(teacher || student) of spatial softmaxes
    attention.temperature 1.0  softmax temperature of the maps
    attention.pairs      {}    name -> pair; each pair:
        teacher, student       intermediates keys (required)
        weight         1.0     weight of this pair
        teacher_kind, student_kind  'auto' | 'window_attention' | 'feature' | 'tokens'.
                               'auto': 'window_attention' if the model's layout lists the key,
                               'tokens' for (B, P + N, C), 'feature' for (B, H, W, C).
        distance       'map'   'map': compare spatial maps (window attention -> attention
                               received per token; features and tokens -> mean_c |F|^p), the
                               teacher's resized to the student grid; 'feature': mean squared
                               error of the raw features (teacher resized to the student
                               grid), which needs equal widths or `adapter`
        adapter        False   learn a 1x1 projection student width -> teacher width
                               (distance 'feature' only)
    manifold.weight      0.0   beta: multiplies the layer-averaged manifold loss
    manifold.intra_weight 4.0  w_patch of the reference recipe, on the N x N intra-image term
    manifold.inter_weight 0.1  w_sample, on the B x B inter-image (per token position) term
    manifold.random_weight 0.2 w_rand, on the K x K term over randomly sampled pooled tokens
    manifold.num_samples 192   K (indices drawn from the `rng` given to apply)
    manifold.grid        'min' common token grid when counts differ: 'min' (downsample the
                               larger), 'student' or 'teacher'
    manifold.pairs       {}    name -> {teacher, student, weight 1.0, teacher_kind 'auto',
                               student_kind 'auto'} (kinds 'feature' or 'tokens'); the loss is
                               weight * sum_pairs pair.weight * (w_i intra + w_e inter
                               + w_r random) / num_pairs, as in the reference (first 4 + last 4
                               blocks: `first_last_pairs`)

A `(B, P + N, C)` tokens tensor drops the model's `num_prefix_tokens` first and is viewed as
the model's `token_grid` (or a square). Multi-teacher: pass a list of teacher logits to
`apply`; logit terms then use the average of the teachers' probabilities (hard: their argmax);
intermediates come from one teacher.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from kdflax.distill import attention as attn_lib
from kdflax.distill import losses
from kdflax.distill import manifold as manifold_lib
from kdflax.models.layout import ModelLayout

Array = jax.Array

KINDS = ('auto', 'window_attention', 'feature', 'tokens')
DISTANCES = ('map', 'feature')
GRIDS = ('min', 'student', 'teacher')
_ATTENTION_PAIR = {'teacher': None, 'student': None, 'weight': 1.0, 'teacher_kind': 'auto',
                   'student_kind': 'auto', 'distance': 'map', 'adapter': False}
_MANIFOLD_PAIR = {'teacher': None, 'student': None, 'weight': 1.0, 'teacher_kind': 'auto',
                  'student_kind': 'auto'}


def default_loss_config() -> ml_collections.ConfigDict:
  """The loss schema with its defaults (plain cross-entropy); see the module docstring."""
  return ml_collections.ConfigDict({
      'ce': {'weight': 1.0, 'label_smoothing': 0.0, 'logits': 'logits'},
      'kd': {'weight': 0.0, 'temperature': 4.0, 'logits': 'logits'},
      'dkd': {'weight': 0.0, 'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0, 'warmup_steps': 0,
              'logits': 'logits'},
      'hard': {'weight': 0.0, 'logits': 'logits', 'distillation_token': False,
               'label_smoothing': 0.0},
      'attention': {'weight': 0.0, 'p': 2.0, 'normalize': 'l2', 'temperature': 1.0,
                    'pairs': {}},
      'manifold': {'weight': 0.0, 'intra_weight': 4.0, 'inter_weight': 0.1,
                   'random_weight': 0.2, 'num_samples': 192, 'grid': 'min', 'pairs': {}},
  })


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


@dataclasses.dataclass(frozen=True)
class _Side:
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
    if self.kind == 'window_attention':
      return attn_lib.window_attention_map(x, self.layout)
    return attn_lib.activation_map(self.features(x), p)

  def batch(self, shape: Sequence[int]) -> int:
    if self.kind == 'window_attention':
      _, _, _, _, n_h, n_w = attn_lib.window_grid(self.layout)
      return shape[0] // (n_h * n_w)
    return shape[0]


@dataclasses.dataclass(frozen=True)
class _Pair:
  name: str
  teacher: _Side
  student: _Side
  weight: float
  distance: str = 'map'
  adapter: bool = False


def _number(path: str, value: Any, minimum: float | None = None, strict: bool = False
            ) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'loss config {path} must be a number, got {value!r}')
  if minimum is not None and (value <= minimum if strict else value < minimum):
    raise ValueError(f'loss config {path} must be {">" if strict else ">="} {minimum}, '
                     f'got {value!r}')
  return float(value)


def _as_dict(value: Any) -> dict:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return dict(value)


def _check_schema(config: Mapping[str, Any]) -> dict:
  """The config as plain dicts, with defaults filled in; unknown keys are errors."""
  defaults = default_loss_config().to_dict()
  config = _as_dict(config)
  unknown = sorted(set(config) - set(defaults))
  if unknown:
    raise ValueError(f'loss config: unknown term(s) {unknown}; terms are {sorted(defaults)}')
  out = {}
  for term, term_defaults in defaults.items():
    section = _as_dict(config.get(term, {}))
    unknown = sorted(set(section) - set(term_defaults))
    if unknown:
      raise ValueError(f'loss config {term}: unknown key(s) {unknown}; keys are '
                       f'{sorted(term_defaults)}')
    out[term] = {**term_defaults, **section}
  for term, pair_defaults in (('attention', _ATTENTION_PAIR), ('manifold', _MANIFOLD_PAIR)):
    pairs = out[term]['pairs']
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
                         f'{sorted(pair_defaults)}, got {pair!r}')
      pair = _as_dict(pair)
      unknown = sorted(set(pair) - set(pair_defaults))
      if unknown:
        raise ValueError(f'loss config {term}.pairs.{name}: unknown key(s) {unknown}; keys '
                         f'are {sorted(pair_defaults)}')
      for required in ('teacher', 'student'):
        if not isinstance(pair.get(required), str):
          raise ValueError(f'loss config {term}.pairs.{name}.{required} must name an '
                           f'intermediates key, got {pair.get(required)!r}')
      checked[str(name)] = {**pair_defaults, **pair}
    out[term]['pairs'] = checked
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
    self.teacher_layout = _checked_layout(teacher_layout, 'teacher')
    self.student_layout = _checked_layout(student_layout, 'student')
    self._check_scalars()
    self.attention_pairs = self._build_pairs('attention')
    self.manifold_pairs = self._build_pairs('manifold')
    widths = tuple((p.name, self.teacher_shapes[p.teacher.key][-1])
                   for p in self.attention_pairs if p.adapter)
    self._adapter_inputs = {p.name: self.student_shapes[p.student.key][-1]
                            for p in self.attention_pairs if p.adapter}
    self.adapters = attn_lib.ChannelAdapters(widths) if widths else None
    self.compared_shapes = self._trace_pairs()

  # ---------------------------------------------------------------- configuration checks

  def active(self, term: str) -> bool:
    """Whether `term` (ce, kd, dkd, hard, attention, manifold) contributes to the loss."""
    return self.config[term]['weight'] != 0

  def _check_scalars(self) -> None:
    c = self.config
    for term in c:
      _number(f'{term}.weight', c[term]['weight'])
    ls = _number('ce.label_smoothing', c['ce']['label_smoothing'], 0.0)
    if ls >= 1:
      raise ValueError(f'loss config ce.label_smoothing must be in [0, 1), got {ls}')
    ls = _number('hard.label_smoothing', c['hard']['label_smoothing'], 0.0)
    if ls >= 1:
      raise ValueError(f'loss config hard.label_smoothing must be in [0, 1), got {ls}')
    for term in ('kd', 'dkd'):
      _number(f'{term}.temperature', c[term]['temperature'], 0.0, strict=True)
    _number('dkd.alpha', c['dkd']['alpha'], 0.0)
    _number('dkd.beta', c['dkd']['beta'], 0.0)
    warmup = c['dkd']['warmup_steps']
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
      raise ValueError(f'loss config dkd.warmup_steps must be an integer >= 0, got {warmup!r}')
    _number('attention.p', c['attention']['p'], 0.0, strict=True)
    _number('attention.temperature', c['attention']['temperature'], 0.0, strict=True)
    if c['attention']['normalize'] not in attn_lib.NORMALIZATIONS:
      raise ValueError(f'loss config attention.normalize must be one of '
                       f'{attn_lib.NORMALIZATIONS}, got {c["attention"]["normalize"]!r}')
    for key in ('intra_weight', 'inter_weight', 'random_weight'):
      _number(f'manifold.{key}', c['manifold'][key])
    k = c['manifold']['num_samples']
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f'loss config manifold.num_samples must be an integer >= 1, got {k!r}')
    if c['manifold']['grid'] not in GRIDS:
      raise ValueError(f'loss config manifold.grid must be one of {GRIDS}, '
                       f'got {c["manifold"]["grid"]!r}')
    for term in ('ce', 'kd', 'dkd', 'hard'):
      if self.active(term) and not (term == 'hard' and c['hard']['distillation_token']):
        self._check_logits_key(f'{term}.logits', c[term]['logits'])
    if self.active('hard') and c['hard']['distillation_token']:
      for key in ('cls_logits', 'dist_logits'):
        self._check_logits_key('hard.distillation_token', key)
    for term in ('attention', 'manifold'):
      if self.active(term) and not c[term]['pairs']:
        raise ValueError(f'loss config {term}.weight is {c[term]["weight"]} but '
                         f'{term}.pairs is empty')

  def _check_logits_key(self, path: str, key: Any) -> None:
    if key == 'logits':
      return
    if key not in self.student_shapes:
      raise ValueError(f'loss config {path}: {key!r} is neither \'logits\' nor a student '
                       f'intermediate; available: {sorted(self.student_shapes)}')
    if len(self.student_shapes[key]) != 2:
      raise ValueError(f'loss config {path}: student intermediate {key!r} has shape '
                       f'{self.student_shapes[key]}, expected (batch, classes) logits')

  def _side(self, path: str, role: str, key: str, kind: str) -> _Side:
    shapes = self.teacher_shapes if role == 'teacher' else self.student_shapes
    layout = self.teacher_layout if role == 'teacher' else self.student_layout
    if key not in shapes:
      raise ValueError(f'loss config {path}.{role}: {key!r} is not a {role} intermediate; '
                       f'available: {sorted(shapes)}')
    shape = shapes[key]
    if kind not in KINDS:
      raise ValueError(f'loss config {path}.{role}_kind must be one of {KINDS}, got {kind!r}')
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
      return _Side(key, kind, layout=tuple(layout.window_attention[key]))
    if kind == 'feature':
      if len(shape) != 4:
        raise ValueError(f'{where}: kind feature needs (B, H, W, C)')
      return _Side(key, kind)
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
    return _Side(key, kind, num_prefix_tokens=prefix, token_grid=grid)

  def _build_pairs(self, term: str) -> tuple[_Pair, ...]:
    if not self.active(term):
      return ()
    pairs = []
    for name, pc in sorted(self.config[term]['pairs'].items()):
      path = f'{term}.pairs.{name}'
      weight = _number(f'{path}.weight', pc['weight'])
      teacher = self._side(path, 'teacher', pc['teacher'], pc['teacher_kind'])
      student = self._side(path, 'student', pc['student'], pc['student_kind'])
      t_batch = teacher.batch(self.teacher_shapes[teacher.key])
      s_batch = student.batch(self.student_shapes[student.key])
      if t_batch != s_batch:
        raise ValueError(f'loss config {path}: teacher {teacher.key!r} has batch {t_batch} '
                         f'but student {student.key!r} has batch {s_batch}')
      distance, adapter = 'map', False
      if term == 'attention':
        distance, adapter = pc['distance'], pc['adapter']
        if distance not in DISTANCES:
          raise ValueError(f'loss config {path}.distance must be one of {DISTANCES}, '
                           f'got {distance!r}')
        if not isinstance(adapter, bool):
          raise ValueError(f'loss config {path}.adapter must be true or false, got {adapter!r}')
        if adapter and distance != 'feature':
          raise ValueError(f"loss config {path}.adapter applies to distance 'feature' only")
      if term == 'manifold' or distance == 'feature':
        for side in (teacher, student):
          if side.kind == 'window_attention':
            raise ValueError(f'loss config {path}: {side.key!r} is window attention, which '
                             f'has no tokens; {term} pairs need features or tokens')
      if distance == 'feature':
        c_t = self.teacher_shapes[teacher.key][-1]
        c_s = self.student_shapes[student.key][-1]
        if c_t != c_s and not adapter:
          raise ValueError(f'loss config {path}: feature distance between student width '
                           f'{c_s} ({student.key!r}) and teacher width {c_t} '
                           f'({teacher.key!r}) needs adapter=True')
      pairs.append(_Pair(name, teacher, student, weight, distance, adapter))
    return tuple(pairs)

  def _trace_pairs(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Shapes of what each pair compares (student, teacher), found by abstract evaluation.

    Also fixes `self._grids`: the `(h, w)` grid each pair's teacher target is resized to.
    """
    out = {}
    self._grids: dict[str, tuple[int, int]] = {}
    for term, pairs in (('attention', self.attention_pairs), ('manifold', self.manifold_pairs)):
      for pair in pairs:
        key = f'{term}/{pair.name}'
        s = jax.ShapeDtypeStruct(self.student_shapes[pair.student.key], jnp.float32)
        t = jax.ShapeDtypeStruct(self.teacher_shapes[pair.teacher.key], jnp.float32)
        try:
          self._grids[key] = self._target_grid(term, pair, s, t)
          s_out, t_out = jax.eval_shape(
              lambda a, b, p=pair, m=term: (self._student_compared(m, p, a),
                                            self._teacher_target(m, p, b)), s, t)
        except (ValueError, TypeError) as e:
          raise ValueError(f'loss config {term}.pairs.{pair.name}: cannot align '
                           f'{pair.student.key!r} with {pair.teacher.key!r}: {e}') from None
        s_shape, t_shape = tuple(s_out.shape), tuple(t_out.shape)
        if pair.adapter:
          s_shape = s_shape[:-1] + (t_shape[-1],)
        # Relations are formed per token, so manifold widths may differ.
        same = s_shape[:-1] == t_shape[:-1] if term == 'manifold' else s_shape == t_shape
        if not same:
          raise ValueError(f'loss config {term}.pairs.{pair.name}: student {s_shape} and '
                           f'teacher {t_shape} do not match after alignment')
        out[key] = (s_shape, t_shape)
    return out

  # ---------------------------------------------------------------- computation

  def _uses_map(self, term: str, pair: _Pair) -> bool:
    return term == 'attention' and pair.distance == 'map'

  def _target_grid(self, term: str, pair: _Pair, s: Any, t: Any) -> tuple[int, int]:
    """The static `(h, w)` both sides of a pair are compared on (from shapes only)."""
    p = self.config['attention']['p']
    if self._uses_map(term, pair):
      return tuple(jax.eval_shape(lambda x: pair.student.spatial_map(x, p), s).shape[1:3])
    s_grid = tuple(jax.eval_shape(pair.student.features, s).shape[1:3])
    if term == 'attention':
      return s_grid
    t_grid = tuple(jax.eval_shape(pair.teacher.features, t).shape[1:3])
    return manifold_lib.matched_grid(s_grid, t_grid, self.config['manifold']['grid'])

  def _student_compared(self, term: str, pair: _Pair, s: Array) -> Array:
    """The student side of a pair (before its adapter): `(B, h, w)` map, `(B, h, w, C_s)`
    features or `(B, N, C_s)` manifold tokens."""
    if self._uses_map(term, pair):
      return pair.student.spatial_map(s, self.config['attention']['p'])
    features = pair.student.features(s)
    if term == 'attention':
      return features
    resized = attn_lib.resize_features(features, self._grids[f'{term}/{pair.name}'])
    return resized.reshape(resized.shape[0], -1, resized.shape[-1])

  def _teacher_target(self, term: str, pair: _Pair, t: Array) -> Array:
    """The teacher side of a pair, aligned to the student: `(B, h, w)` map (attention
    distance 'map'), `(B, h, w, C_t)` features ('feature') or `(B, N, C_t)` tokens
    (manifold)."""
    grid = self._grids[f'{term}/{pair.name}']
    if self._uses_map(term, pair):
      return attn_lib.align(pair.teacher.spatial_map(t, self.config['attention']['p']), grid)
    resized = attn_lib.resize_features(pair.teacher.features(t), grid)
    if term == 'attention':
      return resized
    return resized.reshape(resized.shape[0], -1, resized.shape[-1])

  @property
  def target_shapes(self) -> dict[str, tuple[int, ...]]:
    """`'attention/<pair>'` / `'manifold/<pair>'` -> per-example shape of its teacher target."""
    return {key: t_shape[1:] for key, (_, t_shape) in self.compared_shapes.items()}

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
    pairs = (tuple(('attention', p) for p in self.attention_pairs)
             + tuple(('manifold', p) for p in self.manifold_pairs))
    self._check_call_shapes('teacher', t_int, {p.teacher.key for _, p in pairs})
    return {f'{term}/{p.name}': self._teacher_target(term, p, t_int[p.teacher.key])
            for term, p in pairs}

  def attention_maps(self, student_intermediates: Mapping[str, Any],
                     teacher_intermediates: Mapping[str, Any]) -> dict[str, tuple[Array, Array]]:
    """The maps the attention term compares, per map-distance pair (for pictures).

    Returns:
      `{pair name: (student (B, h, w), teacher (B, h, w))}`, the teacher's already aligned to
      the student's grid, both before normalisation.
    """
    s_int = _unwrap(student_intermediates)
    targets = self.teacher_targets(teacher_intermediates)
    return {p.name: (self._student_compared('attention', p, s_int[p.student.key]),
                     targets[f'attention/{p.name}'])
            for p in self.attention_pairs if self._uses_map('attention', p)}

  def init(self, rng: Array) -> dict:
    """Adapter parameters (`{}` when no pair uses an adapter)."""
    if self.adapters is None:
      return {}
    dummy = {name: jnp.zeros((1, c), jnp.float32) for name, c in self._adapter_inputs.items()}
    return dict(self.adapters.init(rng, dummy)['params'])

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

  def _student_logits(self, key: str, logits: Array, s_int: dict[str, Any]) -> Array:
    if key == 'logits':
      return logits
    if key not in s_int:
      raise ValueError(f'student intermediates lack {key!r}; got {sorted(s_int)}')
    return s_int[key]

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
    c = self.config
    s_int = _unwrap(student_intermediates)
    if teacher_logits is not None:
      teacher_logits = jax.tree.map(jax.lax.stop_gradient, teacher_logits)
      if isinstance(teacher_logits, list):
        teacher_logits = tuple(teacher_logits)
    uses_teacher = any(self.active(t) for t in ('kd', 'dkd', 'hard'))
    if uses_teacher and teacher_logits is None:
      raise ValueError('teacher_logits is None but kd, dkd or hard is active')
    pairs = self.attention_pairs + self.manifold_pairs
    self._check_call_shapes('student', s_int, {p.student.key for p in pairs})
    if teacher_targets is None:
      targets = self.teacher_targets(teacher_intermediates) if pairs else {}
    else:
      targets = dict(teacher_targets)
      for key, shape in self.target_shapes.items():
        if key not in targets:
          raise ValueError(f'teacher_targets lack {key!r} (configured pairs need it); '
                           f'got {sorted(targets)}')
        if tuple(targets[key].shape[1:]) != shape:
          raise ValueError(f'teacher target {key!r} has shape {tuple(targets[key].shape)}; '
                           f'the objective needs (batch, {", ".join(map(str, shape))})')
    targets = jax.tree.map(jax.lax.stop_gradient, targets)

    terms: dict[str, Array] = {}
    if self.active('ce'):
      logits = self._student_logits(c['ce']['logits'], student_logits, s_int)
      terms['ce'] = c['ce']['weight'] * losses.cross_entropy(
          logits, labels if soft_labels is None else soft_labels,
          c['ce']['label_smoothing'], mask)
    if self.active('kd'):
      logits = self._student_logits(c['kd']['logits'], student_logits, s_int)
      terms['kd'] = c['kd']['weight'] * losses.kd_loss(
          logits, teacher_logits, c['kd']['temperature'], mask)
    if self.active('dkd'):
      d = c['dkd']
      if d['warmup_steps'] and step is None:
        raise ValueError('dkd.warmup_steps > 0 needs the training step: apply(..., step=step)')
      logits = self._student_logits(d['logits'], student_logits, s_int)
      terms['dkd'] = d['weight'] * losses.dkd_loss(
          logits, teacher_logits, labels, d['alpha'], d['beta'], d['temperature'], step,
          d['warmup_steps'], mask)
    if self.active('hard'):
      h = c['hard']
      if h['distillation_token']:
        value = losses.deit_distillation_loss(
            self._student_logits('cls_logits', student_logits, s_int),
            self._student_logits('dist_logits', student_logits, s_int),
            teacher_logits, labels, h['label_smoothing'], mask)
      else:
        value = losses.hard_distillation_loss(
            self._student_logits(h['logits'], student_logits, s_int), teacher_logits, mask)
      terms['hard'] = h['weight'] * value
    if self.active('attention'):
      terms.update(self._attention(adapter_params, s_int, targets, mask))
    if self.active('manifold'):
      terms.update(self._manifold(s_int, targets, rng, mask))
    top = [v for k, v in terms.items() if '/' not in k]
    total = sum(top[1:], top[0]) if top else jnp.zeros((), jnp.float32)
    terms['total'] = total
    return total, terms

  def _attention(self, adapter_params: Mapping[str, Any], s_int: dict, targets: dict,
                 mask: Array | None) -> dict[str, Array]:
    a = self.config['attention']
    map_s, map_t, map_w, terms = {}, {}, {}, {}
    adapted = {}
    feature_pairs = [p for p in self.attention_pairs if p.distance == 'feature']
    compared = {p.name: (self._student_compared('attention', p, s_int[p.student.key]),
                         targets[f'attention/{p.name}'])
                for p in self.attention_pairs}
    if self.adapters is not None:
      adapted = self.adapters.apply({'params': adapter_params},
                                    {p.name: compared[p.name][0] for p in feature_pairs
                                     if p.adapter})
    for pair in self.attention_pairs:
      s, t = compared[pair.name]
      if pair.distance == 'map':
        map_s[pair.name], map_t[pair.name] = s, t
        map_w[pair.name] = a['weight'] * pair.weight
        continue
      diff = losses.upcast(adapted.get(pair.name, s)) - losses.upcast(t)
      per_example = jnp.mean(diff * diff, axis=tuple(range(1, diff.ndim)))
      terms[f'attention/{pair.name}'] = (a['weight'] * pair.weight
                                         * losses.masked_mean(per_example, mask))
    if map_s:
      _, map_terms = attn_lib.attention_loss(map_s, map_t, map_w, a['normalize'],
                                             a['temperature'], mask)
      terms.update({f'attention/{k}': v for k, v in map_terms.items()})
    terms = dict(sorted(terms.items()))
    values = list(terms.values())
    terms['attention'] = sum(values[1:], values[0])
    return terms

  def _manifold(self, s_int: dict, targets: dict, rng: Array | None, mask: Array | None
                ) -> dict[str, Array]:
    m = self.config['manifold']
    num_samples = m['num_samples'] if m['random_weight'] != 0 else 0
    if num_samples and rng is None:
      raise ValueError('the manifold loss samples random tokens: apply(..., rng=key) is needed')
    sums = {name: jnp.zeros((), jnp.float32) for name in manifold_lib.TERMS}
    for i, pair in enumerate(self.manifold_pairs):
      s = self._student_compared('manifold', pair, s_int[pair.student.key])
      t = targets[f'manifold/{pair.name}']
      key = jax.random.fold_in(rng, i) if num_samples else None
      values = manifold_lib.relation_terms(s, t, key, num_samples, mask)
      for name in manifold_lib.TERMS:
        sums[name] = sums[name] + pair.weight * values[name]
    scale = m['weight'] / len(self.manifold_pairs)
    weights = {'intra': m['intra_weight'], 'inter': m['inter_weight'],
               'random': m['random_weight']}
    terms = {f'manifold/{name}': scale * weights[name] * sums[name]
             for name in manifold_lib.TERMS}
    terms['manifold'] = sum(terms.values(), jnp.zeros((), jnp.float32))
    return terms
