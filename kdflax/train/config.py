"""Run configuration: the base `ConfigDict`, loading with `--config.key=value` overrides, saving.

Config files in `configs/` define `get_config()` that starts from `base_config()` and sets
what differs. Sections:

    seed          one integer for init, data order, augmentation, dropout and sampling
    data          input pipeline (`kdflax.data.default_data_config()`)
    model         the student: name, overrides (create_model fields), image_size (0: default),
                  init_checkpoint (a model dir to start from; heads of another size re-init)
    teacher       the teacher: name, overrides, image_size, init_checkpoint (for fine-tuning),
                  checkpoint (model dir used by `distill`; empty: the pipeline's teacher stage),
                  cache (a `kdflax cache-teacher` directory: `distill` reads the teacher's
                  outputs from it instead of running the teacher; empty: live teacher),
                  and its own `optim` and `train` sections for the `teacher` stage
    loss          distillation objective (`kdflax.distill.objective.default_loss_config()`);
                  the teacher and baseline stages use only its cross-entropy settings
    optim         optimizer of the student stages (`kdflax.train.optim.default_optim_config()`)
    train         lengths and intervals of the student stages (see `default_train_config`)
    export        what `pipeline` exports at the end: precisions, calibration_images (from
                  the train split), eval_images (parity and accuracy, from the eval split),
                  qat (epochs > 0: the int8 file comes from the student fine-tuned that many
                  epochs with simulated int8 at qat.learning_rate; `kdflax.pipeline.run`)
    distributed   multi-host set-up (`jax.distributed.initialize`)

Every key can be overridden on the command line, e.g. `--config.optim.learning_rate=3e-4`.
The loaded config (file and overrides) is checked against `base_config()`
(`kdflax.train.config_check`): an unknown key (with a "did you mean" hint), a value of the
wrong type or out of range is a one-line `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from kdflax import atomic
from kdflax.train.config_check import ConfigError, check_config, check_schema, get_config_error
from kdflax.train.optim import default_optim_config

RESOLVED_CONFIG = 'config.json'
CONFIG_HISTORY = 'config_history.jsonl'


def default_train_config() -> ml_collections.ConfigDict:
  """Keys of `config.train` (and `config.teacher.train`).

  batch_size: global batch (all devices and processes); must divide by the device count.
  eval_batch_size: global eval batch (0: batch_size).
  num_epochs / num_steps: length; num_steps > 0 wins.
  log_every, eval_every, checkpoint_every: in steps (0 for eval/checkpoint: once per epoch).
  keep_checkpoints: how many recent checkpoints to keep.
  compute_dtype: 'float32' or 'bfloat16' (params stay float32).
  ema_decay: 0 disables the EMA of the weights; eval and export use the EMA when on.
  progress: show a progress bar.
  """
  return ml_collections.ConfigDict(dict(
      batch_size=64, eval_batch_size=0, num_epochs=10, num_steps=0, log_every=20,
      eval_every=0, checkpoint_every=0, keep_checkpoints=2, compute_dtype='float32',
      ema_decay=0.0, progress=True))


def _model_section(name: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, overrides=ml_collections.ConfigDict(), image_size=0, init_checkpoint=''))


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (see the module docstring)."""
  from kdflax.data.config import default_data_config
  from kdflax.distill.objective import default_loss_config

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = default_data_config()
  config.model = _model_section('mobilenetv3_large_100')
  config.teacher = _model_section('swin_tiny_patch4_window7_224')
  config.teacher.checkpoint = ''
  config.teacher.cache = ''
  config.teacher.optim = default_optim_config()
  config.teacher.train = default_train_config()
  config.loss = default_loss_config()
  config.optim = default_optim_config()
  config.train = default_train_config()
  config.export = ml_collections.ConfigDict(dict(
      precisions=('fp32', 'int8'), calibration_images=64, eval_images=500, enabled=True,
      qat=ml_collections.ConfigDict(dict(epochs=0, learning_rate=1e-4))))
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=1, process_id=0))
  return config


def load_sibling(config_file: str, name: str):
  """Imports `name.py` from the folder of `config_file` (config files sharing a base).

      # configs/beans_hybrid.py
      def get_config():
        config = load_sibling(__file__, 'beans_common').get_config()
  """
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'kdflax_configs_{name}', path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f'{config_file}: sibling config {path!r} does not exist')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_OVERRIDE = re.compile(r'^--?config\.([A-Za-z0-9_.]+)(=.*)?$')


def _check_override_keys(config: ml_collections.ConfigDict, argv: Sequence[str],
                         source: str) -> None:
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    node, walked = config, []
    for part in match.group(1).split('.'):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        walked.append(part)
        continue
      if isinstance(node, ml_collections.ConfigDict) and walked and walked[-1] == 'overrides':
        break  # create_model overrides are free-form; the registry validates them
      where = '.'.join(walked) or 'the top level'
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = f" (did you mean '{'.'.join([*walked, close[0]])}'?)" if close else ''
      raise ConfigError(f'unknown config key {match.group(1)!r} in {arg!r} ({source}){hint}; '
                        f'keys under {where}: {", ".join(known)}')


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path`'s `get_config()` and applies `--config.key=value` overrides.

  Args:
    path: a Python config file; `path:arg` passes `arg` to `get_config`.
    overrides: command-line arguments; those that are not `--config.*` are ignored.

  Raises:
    ConfigError: missing/broken file, unknown key, a value of the wrong type or out of range
      (`kdflax.train.config_check`), in one line naming the file and the key.
  """
  file_part = path.split(':', 1)[0]
  if not os.path.isfile(file_part):
    raise ConfigError(f'config file {file_part!r} does not exist')
  wanted = [a for a in overrides if _OVERRIDE.match(a)]
  try:
    base = _load_without_overrides(path)
  except Exception as e:  # noqa: BLE001 - a user's config file can raise anything.
    raise get_config_error(e, file_part) from None
  if not isinstance(base, ml_collections.ConfigDict):
    raise ConfigError(f'{file_part}: get_config() returned {type(base).__name__}; expected an '
                      'ml_collections.ConfigDict (start from base_config())')
  reference = base_config()
  check_schema(base, reference, file_part)
  _check_override_keys(base, wanted, file_part)
  # `*.overrides.<field>` may name create_model fields the config file did not set, which
  # ml_collections' locked parsing cannot add: those are applied here after parsing.
  free = [a for a in wanted if '.overrides.' in a.split('=', 1)[0]]
  argv = ['kdflax', f'--config={path}', *[a for a in wanted if a not in free]]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
  except flags.Error as e:
    raise ConfigError(f'{file_part}: {e}') from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{file_part}: bad override: {type(e).__name__}: {e}') from None
  config = values.config
  for arg in free:
    _set_free_override(config, arg, file_part)
  origins = {_OVERRIDE.match(a).group(1): a for a in wanted}
  check_config(config, reference, file_part, origins)
  return config


def _set_free_override(config: ml_collections.ConfigDict, arg: str, source: str) -> None:
  import ast
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


def _load_without_overrides(path: str) -> ml_collections.ConfigDict:
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                  sys_argv=['kdflax', f'--config={path}'])
  values(['kdflax', f'--config={path}'])
  return values.config


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
