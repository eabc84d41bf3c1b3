"""The interface of one loss term: its config section, its checks and its computation.

    class CosineKD(LossTerm):             # kdflax/distill/terms/cosine.py
      name = 'cosine'
      defaults = {'weight': 0.0, 'logits': 'logits'}
      uses_teacher_logits = True

      def __call__(self, x: Inputs) -> dict[str, Array]:
        s, t = x.student(self.section['logits']), x.teacher_logits
        return {'cosine': self.weight * (1 - cosine_similarity(s, t))}

Registered in `kdflax.distill.terms.TERMS`, a term is a section of the loss config
(`defaults`, which `default_loss_config()` and the config-file checks take from here),
validated by `check` on every config (active or not) and built (`__init__`) only when its
`weight` is nonzero, against the models' intermediates shapes and layouts (`Context`): a bad
pairing fails there, naming the config key, never inside `jit`. `__call__` returns the
term's weighted value under its name (and any logged sub-terms as `name/...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax

from kdflax.models.layout import ModelLayout

Array = jax.Array


def number(path: str, value: Any, minimum: float | None = None, strict: bool = False) -> float:
  """`value` as a float; a non-number or one below `minimum` is a ValueError naming `path`."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f'loss config {path} must be a number, got {value!r}')
  if minimum is not None and (value <= minimum if strict else value < minimum):
    raise ValueError(f'loss config {path} must be {">" if strict else ">="} {minimum}, '
                     f'got {value!r}')
  return float(value)


def fraction(path: str, value: Any) -> float:
  """A number in [0, 1) (e.g. label smoothing)."""
  value = number(path, value, 0.0)
  if value >= 1:
    raise ValueError(f'loss config {path} must be in [0, 1), got {value}')
  return value


def count(path: str, value: Any, minimum: int) -> int:
  """An integer >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'loss config {path} must be an integer >= {minimum}, got {value!r}')
  return value


def one_of(path: str, value: Any, choices: Sequence[Any]) -> Any:
  if value not in choices:
    raise ValueError(f'loss config {path} must be one of {tuple(choices)}, got {value!r}')
  return value


@dataclasses.dataclass(frozen=True)
class Context:
  """What the models offer: intermediates shapes (key -> shape) and layouts."""

  teacher_shapes: Mapping[str, tuple[int, ...]]
  student_shapes: Mapping[str, tuple[int, ...]]
  teacher_layout: ModelLayout
  student_layout: ModelLayout

  def check_logits_key(self, path: str, key: Any) -> None:
    """`key` is 'logits' (the model output) or a `(B, K)` student intermediate."""
    if key == 'logits':
      return
    if key not in self.student_shapes:
      raise ValueError(f'loss config {path}: {key!r} is neither \'logits\' nor a student '
                       f'intermediate; available: {sorted(self.student_shapes)}')
    if len(self.student_shapes[key]) != 2:
      raise ValueError(f'loss config {path}: student intermediate {key!r} has shape '
                       f'{self.student_shapes[key]}, expected (batch, classes) logits')


@dataclasses.dataclass(frozen=True)
class Inputs:
  """One call's arrays (teacher ones already under `stop_gradient`).

  Attributes:
    student_logits: `(B, K)` returned by the student.
    student_intermediates: the student's unwrapped intermediates (`key -> array`).
    teacher_logits: `(B, K)`, a tuple of them (multi-teacher), or None.
    targets: the pair terms' teacher targets (`'<term>/<pair>' -> array`).
    labels: `(B,)` int; soft_labels: `(B, K)` or None (mixup/CutMix, for cross-entropy).
    mask: `(B,)` example weights or None; step: training step or None; rng: key or None.
    params: the objective's trained parameters (adapters), `name -> tree`.
  """

  student_logits: Array
  student_intermediates: Mapping[str, Array]
  teacher_logits: Array | tuple[Array, ...] | None
  targets: Mapping[str, Array]
  labels: Array
  soft_labels: Array | None = None
  mask: Array | None = None
  step: Array | int | None = None
  rng: Array | None = None
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def student(self, key: str) -> Array:
    """The student logits named `key`: 'logits' or a `(B, K)` intermediate."""
    if key == 'logits':
      return self.student_logits
    if key not in self.student_intermediates:
      raise ValueError(f'student intermediates lack {key!r}; got '
                       f'{sorted(self.student_intermediates)}')
    return self.student_intermediates[key]


class LossTerm:
  """Base of every registered term (see the module docstring)."""

  name: ClassVar[str]
  defaults: ClassVar[Mapping[str, Any]]
  uses_teacher_logits: ClassVar[bool] = False

  @classmethod
  def check(cls, section: Mapping[str, Any]) -> None:
    """Checks the section's own values (every config, active or not); ValueError naming them."""

  def __init__(self, section: Mapping[str, Any], context: Context):
    self.section = dict(section)
    self.weight = float(section['weight'])
    self.context = context

  # Terms that read the teacher's intermediates (pairs) override these three.
  @property
  def compared_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """`'<term>/<pair>'` -> (student, teacher) shapes of what each pair compares."""
    return {}

  def teacher_keys(self) -> set[str]:
    """Teacher intermediates keys the term reads."""
    return set()

  def teacher_targets(self, teacher: Mapping[str, Array]) -> dict[str, Array]:
    """`'<term>/<pair>' -> ` the teacher's side of each pair, aligned to the student."""
    return {}

  def student_keys(self) -> set[str]:
    """Student intermediates keys the term reads (checked on every call)."""
    return set()

  def init(self, rng: Array) -> dict[str, Any]:
    """Trained parameters of the term (e.g. adapters); `{}` for most terms."""
    return {}

  def __call__(self, inputs: Inputs) -> dict[str, Array]:
    raise NotImplementedError
