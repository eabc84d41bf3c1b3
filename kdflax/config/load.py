"""Loading a run config: a config file's `get_config()`, `--config.key=value` overrides, checks.

    config = load_config('configs/beans_hybrid.py', ['--config.optim.learning_rate=3e-4'])
    save_config(config, workdir)      # workdir/config.json and a line of config_history.jsonl

Config files import their base like the flax examples do. A file in a package folder (one with
an `__init__.py`, like `configs/`) is imported as `<package>.<module>`, with the package's
parent folder on `sys.path` only while it loads, so `configs/beans_hybrid.py` starts with
`from configs import beans_common`. A file outside any package is loaded by its path.
`path:arg` passes `arg` to `get_config` (`configs/colab_tpu.py:quickstart`).

Overrides are parsed by `ml_collections.config_flags` (`DEFINE_config_dict`: each value is
parsed to the type of the key it replaces). Two things it does not do are done here: an unknown
key is a one-line `ConfigError` with the nearest known key as a hint (as in a file,
`kdflax.config.check.key_hint`), and keys under an `overrides` section (create_model fields
the file did not set, which a locked config cannot take) are added after parsing.

The loaded config (file and overrides) is checked against `base_config()`
(`kdflax.config.check`): an unknown key, a value of the wrong type or out of range is a
one-line `ConfigError` naming the file and the key; so is an exception in `get_config()`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import time
import traceback
import types
from collections.abc import Iterator, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from kdflax import atomic
from kdflax.config.check import ConfigError, check_config, check_schema, key_hint, one_line
from kdflax.config.schema import base_config

RESOLVED_CONFIG = 'config.json'
CONFIG_HISTORY = 'config_history.jsonl'

_OVERRIDE = re.compile(r'^--?config\.([A-Za-z0-9_.]+)(=.*)?$')


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path`'s `get_config()` and applies `--config.key=value` overrides.

  Args:
    path: a Python config file; `path:arg` passes `arg` to `get_config`.
    overrides: command-line arguments; those that are not `--config.*` are ignored.

  Returns:
    The config, locked (no new keys), checked against `base_config()`.

  Raises:
    ConfigError: missing/broken file, unknown key, a value of the wrong type or out of range
      (`kdflax.config.check`), in one line naming the file and the key.
  """
  file_part, has_argument, argument = path.partition(':')
  if not os.path.isfile(file_part):
    raise ConfigError(f'config file {file_part!r} does not exist')
  wanted = [a for a in overrides if _OVERRIDE.match(a)]
  try:
    with config_module(file_part) as module:
      config = module.get_config(*([argument] if has_argument else []))
  except Exception as e:  # noqa: BLE001 - a user's config file can raise anything.
    raise get_config_error(e, file_part) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{file_part}: get_config() returned {type(config).__name__}; expected an '
                      'ml_collections.ConfigDict (start from base_config())')
  reference = base_config()
  check_schema(config, reference, file_part)
  _check_override_keys(config, reference, wanted, file_part)
  config = _apply_overrides(config, wanted, file_part)
  origins = {_OVERRIDE.match(a).group(1): a for a in wanted}
  check_config(config, reference, file_part, origins)
  return config


# ------------------------------------------------------------------------- the config file


def _package_module(path: str) -> tuple[str, str] | None:
  """`(sys.path entry, dotted module name)` of a file in a package folder; None outside one."""
  folder, name = os.path.split(os.path.abspath(path))
  parts = [os.path.splitext(name)[0]]
  while os.path.isfile(os.path.join(folder, '__init__.py')):
    folder, package = os.path.split(folder)
    parts.insert(0, package)
  return (folder, '.'.join(parts)) if len(parts) > 1 else None


def _modules_of(package: str) -> dict[str, types.ModuleType]:
  return {name: module for name, module in sys.modules.items()
          if name == package or name.startswith(f'{package}.')}


@contextlib.contextmanager
def config_module(path: str) -> Iterator[types.ModuleType]:
  """The module of config file `path`, importable with its package while the block runs.

  A file in a package folder is imported as `<package>.<module>` with the package's parent
  folder first on `sys.path` and that package's modules fresh; after the block `sys.path` and
  the `sys.modules` entries of that package are as before (so `tests/configs/` and `configs/`,
  both packages named `configs`, load one after the other). A file outside any package is
  executed from its path.
  """
  found = _package_module(path)
  if found is None:
    spec = importlib.util.spec_from_file_location('kdflax_config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    return
  root, dotted = found
  package = dotted.split('.', 1)[0]
  saved_path, saved_modules = list(sys.path), _modules_of(package)
  for name in saved_modules:
    del sys.modules[name]
  sys.path.insert(0, root)
  importlib.invalidate_caches()
  try:
    yield importlib.import_module(dotted)
  finally:
    sys.path[:] = saved_path
    for name in _modules_of(package):
      del sys.modules[name]
    sys.modules.update(saved_modules)


# ------------------------------------------------------------------------------- overrides


def _check_override_keys(config: ml_collections.ConfigDict,
                         reference: ml_collections.ConfigDict, argv: Sequence[str],
                         source: str) -> None:
  for arg in argv:
    match = _OVERRIDE.match(arg)
    node, walked = config, []
    for part in match.group(1).split('.'):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        walked.append(part)
        continue
      if isinstance(node, ml_collections.ConfigDict) and walked and walked[-1] == 'overrides':
        break  # create_model overrides are free-form; the registry validates them
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      hint = key_hint('.'.join([*walked, part]), known, reference)
      raise ConfigError(f'unknown config key {match.group(1)!r} in {arg!r} ({source}){hint}')


def _apply_overrides(config: ml_collections.ConfigDict, argv: Sequence[str],
                     source: str) -> ml_collections.ConfigDict:
  """`config` (locked) with the `--config.*` arguments `argv` applied."""
  # `*.overrides.<field>` may name create_model fields the config file did not set, which
  # ml_collections' locked parsing cannot add: those are applied after parsing.
  free = [a for a in argv if '.overrides.' in a.split('=', 1)[0]]
  args = ['kdflax', *[a for a in argv if a not in free]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_dict('config', config, 'run config', flag_values=values,
                                  lock_config=True, sys_argv=args)
  try:
    values(args)
  except flags.Error as e:
    raise ConfigError(f'{source}: {e}') from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{source}: bad override: {type(e).__name__}: {e}') from None
  config = values.config
  for arg in free:
    _set_free_override(config, arg, source)
  return config


def _set_free_override(config: ml_collections.ConfigDict, arg: str, source: str) -> None:
  key, sep, raw = arg.lstrip('-')[len('config.'):].partition('=')
  if not sep:
    raise ConfigError(f'{source}: {arg!r} needs a value (--config.{key}=VALUE)')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # a bare word is a string
  *parents, field = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[field] = value


# ------------------------------------------------------------------- get_config() failures

# ml_collections' type-safe assignment, e.g. `config.optim.learning_rate = 'fast'`.
_CAST_ERROR = re.compile(r"Could not override field '(?P<field>[^']+)' \(reference\)\. "
                         r"(?P<value>.*) is of original type <class '(?P<found>[\w.]+)'> and "
                         r"cannot be casted to type <class '(?P<expected>[\w.]+)'>", re.S)
_ASSIGNMENT = re.compile(r'^\s*config((?:\.\w+)+)\s*=(?!=)')


def _class_name(qualified: str, expected: bool = False) -> str:
  name = qualified.rsplit('.', 1)[-1]
  if name == 'ConfigDict':
    return 'a section (a dict of keys)'
  or_int = ' (or int)' if expected and name == 'float' else ''
  return f'{"an" if name[0] in "aeiou" else "a"} {name}{or_int}'


def _config_frame(error: BaseException, path: str) -> traceback.FrameSummary | None:
  """The innermost traceback frame in the config file's folder (it or a config it imports)."""
  folder = os.path.dirname(os.path.abspath(path))
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.dirname(os.path.abspath(f.filename)) == folder]
  return frames[-1] if frames else None


def _message(error: BaseException) -> str:
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)) and text[:1] in '\'"' and text[-1:] == text[:1]:
    try:
      text = str(ast.literal_eval(text))  # ml_collections: AttributeError(repr(KeyError))
    except (ValueError, SyntaxError):
      pass
  return text


def get_config_error(error: BaseException, path: str) -> ConfigError:
  """One line for an exception from a config file's `get_config()`, naming the file and line.

  A type-safe assignment of the wrong type becomes `FILE:LINE: config.optim.learning_rate is
  fast (a str); expected a float (or int)`.
  """
  frame = _config_frame(error, path)
  where = path
  if frame is not None:
    same = os.path.abspath(frame.filename) == os.path.abspath(path)
    where = f'{path}:{frame.lineno}' if same else f'{path} ({frame.filename}:{frame.lineno})'
  cast = _CAST_ERROR.search(str(error)) if isinstance(error, TypeError) else None
  if cast:
    assigned = _ASSIGNMENT.match(frame.line or '') if frame is not None else None
    key = f'config{assigned.group(1)}' if assigned else repr(cast['field'])
    return ConfigError(one_line(f'{where}: {key} is {cast["value"]} '
                                f'({_class_name(cast["found"])}); expected '
                                f'{_class_name(cast["expected"], expected=True)}'))
  return ConfigError(one_line(f'{where}: get_config() failed: {type(error).__name__}: '
                              f'{_message(error)}'))


# ----------------------------------------------------------------------------------- saving


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to `workdir/config.json` (atomically); returns the path.

  Each call also appends `{"time", "config"}` to `workdir/config_history.jsonl`, so a resume
  with other settings (or a run stopped by the NaN guard) never hides the config an earlier
  part of the run used.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESOLVED_CONFIG)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  entry = json.dumps({'time': round(time.time(), 3), 'config': json.loads(text)})
  with open(os.path.join(workdir, CONFIG_HISTORY), 'a') as f:
    f.write(entry + '\n')
  atomic.write_text(path, text)
  return path
