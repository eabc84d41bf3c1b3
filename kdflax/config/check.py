"""Checks a loaded run config against the schema of `base_config()`, in one-line errors.

    check_config(config, base_config(), 'configs/mine.py')   # raises ConfigError

Three kinds of mistake, each reported as one line naming the source and the dotted key:

  unknown key   a key `base_config()` does not have, with the nearest known key as a hint:
                `configs/mine.py: unknown config key 'train.num_step' (did you mean
                'train.num_steps'?)`. Free-form: anything under a key named `overrides`
                (create_model fields, checked by the model registry) and the names of
                `loss.attention.pairs` / `loss.manifold.pairs` (each pair's keys are checked).
  wrong type    a value whose type differs from the default's: `config.optim.learning_rate is
                a str ('fast'); expected a float`. An int is a float; a `placeholder(int)`
                default (None) takes None or an int; a tuple default takes a tuple or a list.
  out of range  `config.train.log_every must be >= 1, found 0` (`train` / `teacher.train`,
                `optim` / `teacher.optim`, `export`, `distributed`, seed and image sizes; the
                data section is checked when the data is built,
                `kdflax.data.config.check_data_config`, and the loss when the objective is).

Values set by a `--config.key=value` override are attributed to it (`origins`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

FREE_FORM = 'overrides'
PAIR_SECTIONS = ('loss.attention.pairs', 'loss.manifold.pairs')
REQUIRED_PAIR_KEYS = ('teacher', 'student')
COMPUTE_DTYPES = ('float32', 'bfloat16')           # kdflax.train.stages.DTYPES
OPTIMIZERS = ('adamw', 'sgd', 'lamb')              # kdflax.train.optim.make_optimizer
SCHEDULES = ('cosine', 'constant')                 # kdflax.train.optim.learning_rate_schedule
PRECISIONS = ('fp32', 'fp16', 'int8')              # kdflax.export.tflite.PRECISIONS


class ConfigError(ValueError):
  """A config file or override is invalid (the message is one line)."""


def one_line(text: str) -> str:
  """`text` with every run of whitespace (newlines too) as one space."""
  return ' '.join(str(text).split())


def _short(value: Any, limit: int = 60) -> str:
  text = one_line(repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                       else value))
  return text if len(text) <= limit else text[:limit - 3] + '...'


# ------------------------------------------------------------------------------ schema


def _is_section(value: Any) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, Mapping))


def _default_type(section: ml_collections.ConfigDict, key: str) -> type | None:
  """The type `section[key]` must have; None: anything (a None default without a type)."""
  value = section[key]
  if value is not None:
    return type(value)
  try:
    return section.get_ref(key).get_type()  # a placeholder: FieldReference(None, field_type=T)
  except (AttributeError, TypeError):
    return None


def _type_ok(value: Any, expected: type) -> bool:
  if expected is bool:
    return isinstance(value, bool)
  if isinstance(value, bool):
    return False  # True is an int to Python, never to a config
  if expected is float:
    return isinstance(value, (int, float))
  if expected in (tuple, list):
    return isinstance(value, (tuple, list))
  if issubclass(expected, (ml_collections.ConfigDict, dict)):
    return _is_section(value)
  return isinstance(value, expected)


def _type_name(expected: type) -> str:
  if expected in (tuple, list):
    return 'a tuple or list'
  if issubclass(expected, (ml_collections.ConfigDict, dict)):
    return 'a section (a dict of keys)'
  article = 'an' if expected.__name__[0] in 'aeiou' else 'a'
  return f'{article} {expected.__name__}' + (' (or int)' if expected is float else '')


def _item_type(default: tuple | list) -> type | None:
  """The one type of a non-empty default sequence's items (float if mixed int/float)."""
  types = {float if type(v) is int else type(v) for v in default}
  return types.pop() if len(types) == 1 else None


def _type_problem(value: Any, expected: type | None, placeholder: bool,
                  default: Any) -> str | None:
  """Why `value` does not fit a default of type `expected`; None when it does."""
  if expected is None or (value is None and placeholder):
    return None
  if value is None or not _type_ok(value, expected):
    return f'is {_short(value)} ({type(value).__name__}); expected {_type_name(expected)}'
  if expected in (tuple, list) and default:
    item = _item_type(default)
    bad = [v for v in value if item is not None and not _type_ok(v, item)]
    if bad:
      return (f'is {_short(value)}; expected a tuple or list of {item.__name__}s '
              f'({_short(bad[0])} is not)')
  return None


def _all_keys(reference: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in reference.items():
    dotted = f'{prefix}{key}'
    keys.append(dotted)
    if isinstance(value, ml_collections.ConfigDict) and key != FREE_FORM:
      keys += _all_keys(value, f'{dotted}.')
  return keys


def _hint(dotted: str, siblings: list[str], prefix: str, every_key: list[str]) -> str:
  """` (did you mean 'x.y'?)`: the closest sibling, else the closest key of that name."""
  leaf = dotted.rsplit('.', 1)[-1]
  close = difflib.get_close_matches(leaf, siblings, n=1)
  if close:
    return f" (did you mean '{prefix}{close[0]}'?)"
  same_leaf = [k for k in every_key if difflib.get_close_matches(leaf, [k.rsplit('.', 1)[-1]])]
  close = difflib.get_close_matches(dotted, same_leaf, n=1, cutoff=0.0)
  if close:
    return f" (did you mean '{close[0]}'?)"
  where = prefix.rstrip('.') or 'the top level'
  return f'; keys under {where}: {", ".join(siblings)}'


def key_hint(dotted: str, siblings: list[str], reference: ml_collections.ConfigDict) -> str:
  """The hint after `unknown config key 'dotted'` (an override's unknown key, as a file's).

  Args:
    dotted: the unknown key, e.g. 'train.batch_size'.
    siblings: the keys known beside it.
    reference: `base_config()`, whose keys of the same or a close name are suggested.

  Returns:
    ` (did you mean 'data.batch_size'?)`, or `; keys under train: ...` without a close key.
  """
  prefix = dotted.rpartition('.')[0]
  return _hint(dotted, siblings, f'{prefix}.' if prefix else '', _all_keys(reference))


class _Checker:
  """Walks a config beside its reference; raises ConfigError at the first problem."""

  def __init__(self, reference: ml_collections.ConfigDict, source: str,
               origins: Mapping[str, str] | None):
    self.reference, self.source, self.origins = reference, source, dict(origins or {})
    self.every_key = _all_keys(reference)

  def fail(self, key: str, message: str) -> None:
    origin = self.origins.get(key)
    where = f'{self.source} ({origin})' if origin else self.source
    raise ConfigError(one_line(f'{where}: {message}'))

  def unknown(self, dotted: str, siblings: list[str], prefix: str, anywhere: bool = True
              ) -> None:
    every_key = self.every_key if anywhere else []
    self.fail(dotted, f'unknown config key {dotted!r}{_hint(dotted, siblings, prefix, every_key)}')

  def section(self, config: Any, reference: ml_collections.ConfigDict, prefix: str) -> None:
    known = list(reference.keys())
    for key in config.keys():
      dotted = f'{prefix}{key}'
      if key not in reference:
        self.unknown(dotted, known, prefix)
      self.value(config[key], reference, key, dotted)
    missing = [k for k in known if k not in config]
    if missing:
      where = f'config.{prefix.rstrip(".")}' if prefix else 'the config'
      self.fail(f'{prefix}{missing[0]}', f'{where} lacks key(s) {", ".join(missing)} (start '
                                         'from base_config() and set only what differs)')

  def value(self, value: Any, reference: ml_collections.ConfigDict, key: str,
            dotted: str) -> None:
    default = reference[key]
    expected = _default_type(reference, key)
    problem = _type_problem(value, expected, default is None, default)
    if problem:
      self.fail(dotted, f'config.{dotted} {problem}')
    if dotted in PAIR_SECTIONS:
      self.pairs(value, dotted)
    elif isinstance(default, ml_collections.ConfigDict) and key != FREE_FORM:
      self.section(value, default, f'{dotted}.')

  def pairs(self, pairs: Any, dotted: str) -> None:
    """`name -> {teacher, student, ...}` (or a list of pairs): each pair's keys and types."""
    from kdflax.distill import objective  # the pair schema lives with the objective
    schema = objective.pair_defaults('attention' if 'attention' in dotted else 'manifold')
    items = enumerate(pairs) if isinstance(pairs, (list, tuple)) else pairs.items()
    for name, pair in items:
      where = f'{dotted}.{name}'
      if not _is_section(pair):
        self.fail(dotted, f'config.{where} is {_short(pair)}; expected a dict with keys '
                          f'{", ".join(schema)}')
      for key in pair.keys():
        if key not in schema:
          self.unknown(f'{where}.{key}', list(schema), f'{where}.', anywhere=False)
        expected = str if schema[key] is None else type(schema[key])
        problem = _type_problem(pair[key], expected, False, schema[key])
        if problem:
          self.fail(dotted, f'config.{where}.{key} {problem}')
      missing = [k for k in REQUIRED_PAIR_KEYS if k not in pair]
      if missing:
        self.fail(dotted, f'config.{where} lacks key {missing[0]!r} (each pair names a '
                          'teacher and a student intermediates key)')


def check_schema(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 source: str, origins: Mapping[str, str] | None = None) -> None:
  """Raises ConfigError for the first unknown, missing or wrongly typed key of `config`.

  Args:
    config: the loaded config.
    reference: `base_config()` (the schema and its defaults).
    source: the config file, named in the message.
    origins: dotted key -> the `--config.key=value` argument that set it.
  """
  _Checker(reference, source, origins).section(config, reference, '')


# ------------------------------------------------------------------------------ ranges

Rule = tuple[Callable[[Any], bool], str]


def _at_least(low: float) -> Rule:
  return (lambda v: v >= low), f'must be >= {low}'


def _above(low: float) -> Rule:
  return (lambda v: v > low), f'must be > {low}'


def _fraction(closed: bool = True) -> Rule:
  if closed:
    return (lambda v: 0 <= v <= 1), 'must be in [0, 1]'
  return (lambda v: 0 <= v < 1), 'must be in [0, 1)'


def _percentile() -> Rule:
  return (lambda v: 50 < v <= 100), 'must be in (50, 100]'


def _one_of(options: tuple[str, ...]) -> Rule:
  return (lambda v: v in options), f'must be one of {", ".join(map(repr, options))}'


def _each_one_of(options: tuple[str, ...]) -> Rule:
  return (lambda v: all(x in options for x in v)), \
      f'must list only {", ".join(map(repr, options))}'


TRAIN_RULES: dict[str, Rule] = {
    'num_epochs': _at_least(0), 'num_steps': _at_least(0), 'log_every': _at_least(1),
    'eval_every': _at_least(0), 'checkpoint_every': _at_least(0), 'keep_checkpoints': _at_least(1),
    'compute_dtype': _one_of(COMPUTE_DTYPES), 'ema_decay': _fraction(closed=False),
}
OPTIM_RULES: dict[str, Rule] = {
    'name': _one_of(OPTIMIZERS), 'learning_rate': _above(0), 'warmup_steps': _at_least(0),
    'warmup_fraction': _fraction(), 'schedule': _one_of(SCHEDULES),
    'final_lr_fraction': _fraction(), 'weight_decay': _at_least(0),
    'momentum': _fraction(closed=False), 'b1': _fraction(closed=False),
    'b2': _fraction(closed=False), 'grad_clip_norm': _at_least(0),
}
OTHER_RULES: dict[str, Rule] = {
    'seed': _at_least(0), 'model.image_size': _at_least(0), 'teacher.image_size': _at_least(0),
    'export.precisions': _each_one_of(PRECISIONS), 'export.calibration_images': _at_least(1),
    'export.eval_images': _at_least(1), 'export.qat.epochs': _at_least(0),
    'export.qat.learning_rate': _above(0), 'export.activation_percentile': _percentile(),
    'distributed.num_processes': _at_least(1), 'distributed.process_id': _at_least(0),
}


def range_rules() -> dict[str, Rule]:
  """Dotted key -> (predicate, what it requires), over every checked key."""
  rules = dict(OTHER_RULES)
  for section, section_rules in (('train', TRAIN_RULES), ('teacher.train', TRAIN_RULES),
                                 ('optim', OPTIM_RULES), ('teacher.optim', OPTIM_RULES)):
    rules.update({f'{section}.{key}': rule for key, rule in section_rules.items()})
  return rules


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def range_problem(config: ml_collections.ConfigDict) -> tuple[str, str] | None:
  """`(dotted key, message)` of the first out-of-range value (types already checked)."""
  for dotted, (ok, requirement) in range_rules().items():
    value = _get(config, dotted)
    if not ok(value):
      return dotted, f'config.{dotted} {requirement}, found {_short(value)}'
  for section in ('train', 'teacher.train'):
    train = _get(config, section)
    if train.num_epochs == 0 and train.num_steps == 0:
      return (f'{section}.num_steps', f'config.{section}: num_epochs and num_steps are both '
              '0 (nothing to train; set one of them)')
  dist = config.distributed
  if dist.process_id >= dist.num_processes:
    return ('distributed.process_id', f'config.distributed.process_id must be < num_processes '
            f'({dist.num_processes}), found {dist.process_id}')
  return None


def check_ranges(config: ml_collections.ConfigDict, source: str,
                 origins: Mapping[str, str] | None = None) -> None:
  """Raises ConfigError for the first out-of-range value (see `range_rules`)."""
  found = range_problem(config)
  if found:
    key, message = found
    origin = (origins or {}).get(key)
    raise ConfigError(one_line(f'{source} ({origin}): {message}' if origin
                                else f'{source}: {message}'))


def check_config(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                 source: str, origins: Mapping[str, str] | None = None) -> None:
  """`check_schema` then `check_ranges`: raises ConfigError (one line) at the first problem."""
  check_schema(config, reference, source, origins)
  check_ranges(config, source, origins)
