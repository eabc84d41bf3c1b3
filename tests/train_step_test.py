"""The sharded train step: N devices == 1 device, frozen teacher, one trace, over-fitting."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.tiny_models import TinyCNN, TinyTeacher

from kdflax.distill.objective import Objective, default_loss_config
from kdflax.models import create_model
from kdflax.models.init import init_variables
from kdflax.models.layout import layout_of
from kdflax.train.stages import intermediates_shapes
from kdflax.train.state import create_train_state
from kdflax.train.step import data_mesh, make_eval_step, make_train_step, replicate

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_eight_devices_match_one_device():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'PYTHONPATH': os.pathsep.join([TESTS, os.path.dirname(TESTS)])}
  proc = subprocess.run([sys.executable, os.path.join(TESTS, 'helpers', 'step_parity.py'), '3'],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['devices'] == 8
  assert result['max_abs_diff'] <= 1e-5, result
  assert result['teacher_unchanged']
  assert result['loss_many'] == pytest.approx(result['loss_one'], abs=1e-5)


def _objective(config, student, s_vars, teacher, t_vars, size):
  return Objective(config, intermediates_shapes(teacher, t_vars, size),
                   intermediates_shapes(student, s_vars, size), layout_of(teacher),
                   layout_of(student))


def _batch(size, n=8, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(size=(n, size, size, 3)).astype(np.float32),
          'label': rng.integers(0, classes, n).astype(np.int32)}


def test_traces_once_and_teacher_is_bit_identical():
  student, teacher = TinyCNN(), TinyTeacher()
  x = jnp.zeros((1, 16, 16, 3))
  s_vars, t_vars = student.init(jax.random.key(0), x), teacher.init(jax.random.key(1), x)
  config = default_loss_config()
  config.kd.weight = 1.0
  obj = _objective(config, student, s_vars, teacher, t_vars, 16)
  traces = []

  def loss_fn(*args, **kwargs):
    traces.append(1)
    return obj.apply(*args, **kwargs)

  mesh = data_mesh()
  step = make_train_step(student, teacher, loss_fn, mesh)
  state = replicate(create_train_state(s_vars, obj.init(jax.random.key(2)), optax.adam(1e-2),
                                       ema_decay=0.5), mesh)
  t_copy = jax.tree.map(np.array, t_vars)
  for i in range(10):
    state, metrics = step(state, t_vars, _batch(16, seed=i))
  assert len(traces) == 1
  assert int(state.step) == 10
  for a, b in zip(jax.tree.leaves(t_copy), jax.tree.leaves(t_vars), strict=True):
    assert np.array_equal(a, np.asarray(b))
  # EMA moved towards the raw weights but is not them.
  ema, raw = jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params['student'])
  assert any(not np.allclose(e, r) for e, r in zip(ema, raw, strict=True))


def test_eval_step_counts_only_real_examples():
  student = TinyCNN()
  variables = student.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  batch = _batch(16)
  logits = student.apply(variables, batch['image'])
  batch['label'] = np.array(jnp.argmax(logits, -1), np.int32)
  batch['label'][:3] = (batch['label'][:3] + 1) % 5          # 3 wrong predictions
  batch['mask'] = np.array([1, 0, 0] + [1] * 5, np.float32)  # 2 of the wrong ones are padding
  sums = jax.device_get(make_eval_step(student, data_mesh())(variables, batch))
  assert sums['count'] == 6
  assert sums['top1'] == 5


def _tiny_pair():
  teacher, _ = create_model('swin_test_patch4_window4_64', 5, img_size=32, window_size=2,
                            embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
  student, _ = create_model('mobilenetv3_small_050', 5)
  return teacher, init_variables(teacher, 0, 32), student, init_variables(student, 1, 32)


def _overfit(config, student, s_vars, teacher, t_vars, size, steps=30, lr=3e-3):
  obj = _objective(config, student, s_vars, teacher, t_vars, size)
  step = make_train_step(student, teacher, obj.apply, data_mesh())
  state = create_train_state(s_vars, obj.init(jax.random.key(2)), optax.adam(lr))
  batch = _batch(size)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, t_vars, batch)
    losses.append(float(metrics['loss']))
  return losses, metrics


STAGE_PAIRS = {f'stage{i}': {'teacher': f'stage{i}', 'student': f'stage{i}'} for i in range(2)}
OBJECTIVES = {
    'ce': {},
    'kd': {'ce.weight': 0.0, 'kd.weight': 1.0},
    'at': {'ce.weight': 0.0, 'attention.weight': 100.0, 'attention.pairs': STAGE_PAIRS},
    'dkd': {'ce.weight': 0.0, 'dkd.weight': 1.0},
    'manifold': {'ce.weight': 0.0, 'manifold.weight': 1.0, 'manifold.num_samples': 16,
                 'manifold.pairs': STAGE_PAIRS},
}


def _config(settings):
  config = default_loss_config()
  for key, value in settings.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


@pytest.mark.parametrize('name', sorted(OBJECTIVES))
def test_each_objective_overfits_one_batch(name):
  student, teacher = TinyCNN(drop_rate=0.0), TinyTeacher()
  x = jnp.zeros((1, 16, 16, 3))
  s_vars, t_vars = student.init(jax.random.key(0), x), teacher.init(jax.random.key(1), x)
  losses, metrics = _overfit(_config(OBJECTIVES[name]), student, s_vars, teacher, t_vars, 16)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize('manifold', [False, True], ids=['hybrid', 'hybrid+manifold'])
def test_hybrid_swin_to_mobilenetv3_overfits_one_batch(manifold):
  """KD + Swin window attention aligned onto MobileNetV3 stages (+ manifold relations)."""
  teacher, t_vars, student, s_vars = _tiny_pair()
  settings = {'kd.weight': 1.0, 'attention.weight': 10.0, 'attention.pairs': {
      f's{i}': {'teacher': f'stage{i}_attn', 'student': f'stage{i}'} for i in range(4)}}
  if manifold:
    settings.update({'manifold.weight': 1.0, 'manifold.num_samples': 16, 'manifold.pairs': {
        f'm{i}': {'teacher': f'stage{i}', 'student': f'stage{i}'} for i in (0, 3)}})
  losses, metrics = _overfit(_config(settings), student, s_vars, teacher, t_vars, 32)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])
  assert float(metrics['attention']) > 0
  if manifold:
    assert float(metrics['manifold']) > 0
