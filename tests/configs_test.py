"""Every shipped config loads, takes overrides, and its distillation pairings fit its models."""

import glob
import os

import pytest

from kdflax.config import ConfigError, load_config, save_config
from kdflax.distill.objective import Objective
from kdflax.models import complexity, create_model
from kdflax.models.layout import layout_of
from kdflax.train.stages import intermediates_shapes, stage_loss_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not p.endswith(('_common.py', '__init__.py')))


def _model(section):
  module, size = create_model(section.name, 10, **dict(section.overrides))
  size = int(section.image_size or size)
  return module, intermediates_shapes(module, complexity.abstract_variables(module, size), size)


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_config_pairings_fit_the_models(path):
  config = load_config(path)
  student, s_shapes = _model(config.model)
  teacher, t_shapes = _model(config.teacher)
  objective = Objective(stage_loss_config(config, 'distill'), t_shapes, s_shapes,
                        layout_of(teacher), layout_of(student))
  for pair, (s_shape, t_shape) in objective.compared_shapes.items():
    assert s_shape[1:] == t_shape[1:] or pair.startswith('manifold'), (pair, s_shape, t_shape)


def test_overrides_and_saved_config(tmp_path):
  config = load_config(os.path.join(ROOT, 'configs', 'beans_hybrid.py'),
                       ['--config.optim.learning_rate=0.25', '--config.data.batch_size=16',
                        '--config.model.overrides.drop_rate=0.3', '--workdir=/elsewhere'])
  assert config.optim.learning_rate == 0.25 and config.data.batch_size == 16
  assert config.model.overrides.drop_rate == 0.3
  assert 'learning_rate": 0.25' in open(save_config(config, str(tmp_path))).read()


@pytest.mark.parametrize('override, message', [
    ('--config.optim.learning_rat=1', "unknown config key 'optim.learning_rat'"),
    ('--config.nope=1', "unknown config key 'nope'"),
    ('--config.data.batch_size=many', 'batch_size'),
])
def test_bad_overrides(override, message):
  with pytest.raises(ConfigError, match=message):
    load_config(os.path.join(ROOT, 'configs', 'beans_kd.py'), [override])


def test_missing_config_file():
  with pytest.raises(ConfigError, match='does not exist'):
    load_config('configs/no_such_config.py')
