"""The train state: everything a step reads and writes, as one pytree.

    state = create_train_state(student_variables, adapter_params, tx, seed=0, ema_decay=0.9998)

Trainable parameters are one tree `{'student': ..., 'adapters': ...}` so that a single optax
transformation updates the student and the objective's learned adapters together; the
adapters never become part of the exported student. The PRNG key is stored as raw `uint32`
key data so that the whole state checkpoints with Orbax as plain arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Student params/BN stats, adapters, optimizer state, EMA, step and PRNG key.

  Attributes:
    step: scalar int32, number of updates applied so far.
    params: `{'student': student params, 'adapters': objective adapter params}`.
    batch_stats: the student's BatchNorm statistics (`{}` for models without BatchNorm).
    opt_state: optax state of `tx` over `params`.
    ema_params: exponential moving average of `params['student']` (`{}` when disabled).
    rng: `uint32[2]` raw key data; each step folds in `step` (no key is ever reused).
    tx: the optax transformation (static, not saved).
    ema_decay: EMA decay in [0, 1); 0 disables the EMA (static).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

  @property
  def student_variables(self) -> dict[str, Any]:
    """Variables to `apply` the student with (EMA weights excluded)."""
    return _variables(self.params['student'], self.batch_stats)

  @property
  def eval_variables(self) -> dict[str, Any]:
    """The EMA weights when the EMA is on, else the raw student weights."""
    params = self.ema_params if self.ema_decay > 0 else self.params['student']
    return _variables(params, self.batch_stats)

  def key(self) -> jax.Array:
    """This step's typed PRNG key."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables


def create_train_state(student_variables: Mapping[str, Any], adapter_params: Any,
                       tx: optax.GradientTransformation, seed: int = 0,
                       ema_decay: float = 0.0) -> TrainState:
  """A fresh state at step 0.

  Args:
    student_variables: `{'params': ..., ['batch_stats': ...]}` of the model being trained.
    adapter_params: params of the objective's learned adapters (`{}` when none).
    tx: optax transformation applied to `{'student': ..., 'adapters': ...}`.
    seed: seeds dropout, stochastic depth and the random-sampled manifold indices.
    ema_decay: 0 disables the EMA.
  """
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {ema_decay}')
  params = {'student': student_variables['params'], 'adapters': adapter_params or {}}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=student_variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params['student']) if ema_decay > 0 else {},
      rng=jax.random.key_data(jax.random.key(seed)),
      tx=tx,
      ema_decay=float(ema_decay),
  )
