"""Config files are checked against `base_config()` like `--config.*` overrides: unknown keys
(with a "did you mean" hint), wrong types and out-of-range values are one-line errors naming
the file and the key; every shipped config still loads."""

import glob
import os
import sys
import textwrap

import pytest

from kdflax.config import ConfigError, base_config, load_config
from kdflax.config.check import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}
SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 + glob.glob(os.path.join(ROOT, 'tests', 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


def write_config(tmp_path, *lines, name='bad.py'):
  """A config file that starts from base_config() and runs `lines` on `config`."""
  body = textwrap.indent('\n'.join(lines), '  ')
  path = tmp_path / name
  path.write_text('from kdflax.config import base_config\n\n\ndef get_config():\n'
                  f'  config = base_config()\n{body}\n  return config\n')
  return str(path)


def load_error(path, overrides=()):
  with pytest.raises(ConfigError) as info:
    load_config(path, overrides)
  message = str(info.value)
  assert '\n' not in message, message
  return message


@pytest.mark.parametrize('path', SHIPPED, ids=os.path.basename)
def test_every_shipped_config_loads(path):
  config = load_config(path)
  check_config(config, base_config(), path)  # and passes the checks on its own


def test_colab_config_with_its_argument_loads():
  path = os.path.join(ROOT, 'configs', 'colab_tpu.py')
  assert load_config(f'{path}:quickstart').train.compute_dtype == 'bfloat16'
  assert load_config(f'{path}:beans_hybrid').loss.attention.weight == 1.0


def test_a_config_in_a_package_imports_its_base_and_leaves_sys_path_as_it_was():
  def configs_modules():
    return {m for m in sys.modules if m.split('.')[0] == 'configs'}
  path, modules = list(sys.path), configs_modules()
  # configs/beans_manifold.py: `from configs import beans_common, beans_hybrid`.
  assert load_config(os.path.join(ROOT, 'configs', 'beans_manifold.py')).loss.manifold.weight == 1
  # tests/configs/ is another package named `configs` (`from configs import tiny`).
  assert load_config(os.path.join(ROOT, 'tests', 'configs', 'tiny_cache.py')).train.num_steps == 3
  assert sys.path == path and configs_modules() == modules


def test_free_form_sections_take_any_key(tmp_path):
  path = write_config(
      tmp_path, "config.model.overrides = {'drop_rate': 0.1, 'anything_else': (1, 2)}",
      "config.loss.attention.pairs = {'my-pair': {'teacher': 'a', 'student': 'b', 'weight': 2}}",
      'config.data.image_size = 64', 'config.optim.learning_rate = 1')
  config = load_config(path)
  assert config.model.overrides.anything_else == (1, 2) and config.data.image_size == 64


@pytest.mark.parametrize('line, key, hint', [
    ('config.train.num_step = 10', "'train.num_step'", "did you mean 'train.num_steps'?"),
    ('config.optim.learnig_rate = 1e-2', "'optim.learnig_rate'",
     "did you mean 'optim.learning_rate'?"),
    ('config.train.learning_rate = 1e-2', "'train.learning_rate'",
     "did you mean 'optim.learning_rate'?"),
    ("config.trian = {'num_steps': 3}", "'trian'", "did you mean 'train'?"),
    ("config.loss.attention.pairs = {'s0': {'teacher': 'stage0', 'studnet': 'stage0'}}",
     "'loss.attention.pairs.s0.studnet'", "did you mean 'loss.attention.pairs.s0.student'?"),
])
def test_unknown_key_in_file_names_it_with_a_hint(tmp_path, line, key, hint):
  path = write_config(tmp_path, line)
  message = load_error(path)
  assert message.startswith(f'{path}: unknown config key {key}'), message
  assert hint in message, message


@pytest.mark.parametrize('key, home', [
    ('train.batch_size', 'data.batch_size'),
    ('train.eval_batch_size', 'data.eval_batch_size'),
    ('teacher.train.batch_size', 'data.batch_size'),
    ('teacher.train.eval_batch_size', 'data.eval_batch_size'),
    ('data.seed', 'seed'),
])
def test_removed_keys_are_unknown_and_point_to_the_key_that_is_read(tmp_path, key, home):
  # The batch sizes are the data section's; the run has one seed (config.seed).
  path = write_config(tmp_path, f'config.{key} = 32')
  assert load_error(path) == (f"{path}: unknown config key '{key}' "
                              f"(did you mean '{home}'?)")
  message = load_error(TINY, [f'--config.{key}=32'])
  assert f"unknown config key '{key}' in '--config.{key}=32'" in message, message
  assert f"(did you mean '{home}'?)" in message, message


@pytest.mark.parametrize('line, key, found, expected', [
    # ml_collections refuses the assignment: the file's line is named.
    ("config.optim.learning_rate = 'fast'", 'config.optim.learning_rate', 'fast (a str)',
     'expected a float'),
    ('config.train.num_steps = 2.5', 'config.train.num_steps', '2.5 (a float)', 'expected an int'),
    ("config.data.image_size = '112'", 'config.data.image_size', '112 (a str)',
     'expected an int'),
    # What ml_collections lets through: a replaced section, bool for int, None, pairs, items.
    ("config.optim = dict(base_config().optim, learning_rate='fast')",
     'config.optim.learning_rate', "'fast' (str)", 'expected a float (or int)'),
    ('config.train.num_steps = True', 'config.train.num_steps', 'True (bool)', 'expected an int'),
    ('config.data.root = None', 'config.data.root', 'None (NoneType)', 'expected a str'),
    ("config.export.precisions = ('fp32', 8)", 'config.export.precisions', "('fp32', 8)",
     'expected a tuple or list of strs'),
    ("config.loss.manifold.pairs = {'s0': {'teacher': 'stage0', 'student': 3}}",
     'config.loss.manifold.pairs.s0.student', '3 (int)', 'expected a str'),
])
def test_wrong_type_in_file_names_it(tmp_path, line, key, found, expected):
  path = write_config(tmp_path, line)
  message = load_error(path)
  assert message.startswith(path) and f'{key} is {found}' in message, message
  assert expected in message, message


def test_wrong_type_names_the_line_of_the_file(tmp_path):
  path = write_config(tmp_path, 'config.seed = 1', "config.optim.learning_rate = 'fast'")
  assert load_error(path).startswith(f'{path}:7: config.optim.learning_rate is fast')


@pytest.mark.parametrize('line, message', [
    ('config.optim.learning_rate = -0.01', 'config.optim.learning_rate must be > 0, found -0.01'),
    ('config.optim.learning_rate = 0', 'config.optim.learning_rate must be > 0, found 0.0'),
    ('config.teacher.optim.b2 = 1.0', 'config.teacher.optim.b2 must be in [0, 1), found 1.0'),
    ("config.optim.name = 'adam'", "config.optim.name must be one of 'adamw', 'sgd', 'lamb'"),
    ('config.train.log_every = 0', 'config.train.log_every must be >= 1, found 0'),
    ('config.train.num_epochs = -1', 'config.train.num_epochs must be >= 0, found -1'),
    ('config.teacher.train.num_steps = -5', 'config.teacher.train.num_steps must be >= 0'),
    ('config.train.num_epochs = 0', 'config.train: num_epochs and num_steps are both 0'),
    ('config.train.ema_decay = 1.0', 'config.train.ema_decay must be in [0, 1), found 1.0'),
    ("config.train.compute_dtype = 'float16'", 'config.train.compute_dtype must be one of'),
    ("config.export.precisions = ('fp32', 'int4')", "config.export.precisions must list only"),
    ('config.distributed.process_id = 1', 'config.distributed.process_id must be < '
     'num_processes (1), found 1'),
])
def test_out_of_range_in_file_names_it(tmp_path, line, message):
  path = write_config(tmp_path, line)
  assert load_error(path).startswith(f'{path}: {message}')


def test_missing_key_of_a_replaced_section(tmp_path):
  path = write_config(tmp_path, "config.optim = {'learning_rate': 0.1}")
  assert 'config.optim lacks key(s) b1, b2, final_lr_fraction' in load_error(path)


def test_get_config_must_return_a_config_dict(tmp_path):
  path = tmp_path / 'dict.py'
  path.write_text('def get_config():\n  return {"train": {}}\n')
  assert 'get_config() returned dict' in load_error(str(path))


@pytest.mark.parametrize('override, message', [
    ('--config.optim.learnig_rate=0.1',
     "unknown config key 'optim.learnig_rate' in '--config.optim.learnig_rate=0.1'"),
    ('--config.train.num_steps=many', 'flag --config.train.num_steps=many'),
    ('--config.optim.learning_rate=fast', 'flag --config.optim.learning_rate=fast'),
    ('--config.optim.learning_rate=-1',
     '(--config.optim.learning_rate=-1): config.optim.learning_rate must be > 0, found -1.0'),
    ('--config.train.log_every=0',
     '(--config.train.log_every=0): config.train.log_every must be >= 1, found 0'),
])
def test_overrides_are_still_rejected(override, message):
  text = load_error(TINY, [override])
  assert TINY in text and message in text, text


def test_override_hint_and_a_fix_by_override(tmp_path):
  message = load_error(TINY, ['--config.optim.learnig_rate=1'])
  assert "did you mean 'optim.learning_rate'?" in message
  # A value out of range in the file is fine when an override replaces it.
  path = write_config(tmp_path, 'config.optim.learning_rate = -1.0')
  assert load_config(path, ['--config.optim.learning_rate=0.5']).optim.learning_rate == 0.5
