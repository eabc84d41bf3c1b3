"""Runs the same train steps on an N-device mesh and a 1-device mesh; prints a JSON verdict.

Started by tests/train_step_test.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed at JAX start-up).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from helpers.tiny_models import TinyCNN, TinyTeacher
from kdflax.distill.losses import cross_entropy, kd_loss
from kdflax.train.state import create_train_state
from kdflax.train.step import data_mesh, make_train_step, replicate


def loss_fn(adapters, s_logits, s_inter, t_logits, t_inter, labels, *, step, rng, mask):
  ce = cross_entropy(s_logits, labels, mask=mask)
  kd = kd_loss(s_logits, t_logits, temperature=2.0)
  return ce + kd, {'ce': ce, 'kd': kd}


def run(devices, steps: int):
  student, teacher = TinyCNN(), TinyTeacher()
  x = jnp.zeros((1, 16, 16, 3))
  s_vars = student.init(jax.random.key(0), x)
  t_vars = teacher.init(jax.random.key(1), x)
  tx = optax.sgd(0.1, momentum=0.9)
  state = create_train_state(s_vars, {}, tx, seed=3, ema_decay=0.9)
  mesh = data_mesh(devices)
  state = replicate(state, mesh)
  step = make_train_step(student, teacher, loss_fn, mesh)
  rng = np.random.default_rng(0)
  t_before = jax.tree.map(np.asarray, t_vars)
  for _ in range(steps):
    batch = {'image': rng.uniform(size=(16, 16, 16, 3)).astype(np.float32),
             'label': rng.integers(0, 5, size=(16,)).astype(np.int32)}
    state, metrics = step(state, t_vars, batch)
  same_teacher = all(np.array_equal(a, np.asarray(b)) for a, b in
                     zip(jax.tree.leaves(t_before), jax.tree.leaves(t_vars), strict=True))
  return jax.tree.map(np.asarray, (state.params, state.batch_stats, state.ema_params)), \
      same_teacher, {k: float(v) for k, v in metrics.items()}


def main():
  steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
  devices = jax.devices()
  many, same_many, m_many = run(devices, steps)
  one, same_one, m_one = run(devices[:1], steps)
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(many), jax.tree.leaves(one), strict=True))
  print(json.dumps({'devices': len(devices), 'max_abs_diff': diff,
                    'teacher_unchanged': same_many and same_one,
                    'loss_many': m_many['loss'], 'loss_one': m_one['loss']}))


if __name__ == '__main__':
  main()
