"""Optimizer from a config: warm-up + cosine schedule, weight decay, gradient clipping.

    tx = make_optimizer(config.optim, total_steps)

The learning rate is exposed through `optax.inject_hyperparams`, so the train step can log it.
"""

from __future__ import annotations

import ml_collections
import optax


def default_optim_config() -> ml_collections.ConfigDict:
  """Keys of `config.optim`.

  name: 'adamw' | 'sgd' | 'lamb'.
  learning_rate: peak learning rate (after warm-up).
  warmup_steps: linear warm-up from 0; `warmup_fraction` is used when this is 0.
  warmup_fraction: warm-up as a fraction of the total steps.
  schedule: 'cosine' (to `final_lr_fraction * learning_rate`) | 'constant'.
  final_lr_fraction: where the cosine ends, relative to the peak.
  weight_decay: decoupled weight decay (adamw, lamb; L2-style for sgd), not applied to
    biases, norms and 1-D parameters.
  momentum: sgd momentum; b1/b2: Adam betas.
  grad_clip_norm: clip the global gradient norm to this (0 disables).
  """
  return ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-3, warmup_steps=0, warmup_fraction=0.05,
      schedule='cosine', final_lr_fraction=0.0, weight_decay=0.05, momentum=0.9,
      b1=0.9, b2=0.999, grad_clip_norm=1.0))


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up then cosine (or constant) decay over `total_steps` updates."""
  if total_steps < 1:
    raise ValueError(f'total_steps must be >= 1, got {total_steps}')
  warmup = int(config.warmup_steps) or int(round(config.warmup_fraction * total_steps))
  warmup = min(warmup, total_steps - 1)
  peak = float(config.learning_rate)
  if config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                        alpha=float(config.final_lr_fraction))
  elif config.schedule == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optim.schedule: expected 'cosine' or 'constant', "
                     f'got {config.schedule!r}')
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices and conv kernels only (ndim > 1)."""
  import jax
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """The optax transformation for `config.optim` over `total_steps` updates."""
  schedule = learning_rate_schedule(config, total_steps)
  name = config.name

  @optax.inject_hyperparams
  def build(learning_rate):
    if name == 'adamw':
      core = optax.adamw(learning_rate, b1=config.b1, b2=config.b2,
                         weight_decay=config.weight_decay, mask=_decay_mask)
    elif name == 'lamb':
      core = optax.lamb(learning_rate, b1=config.b1, b2=config.b2,
                        weight_decay=config.weight_decay, mask=_decay_mask)
    elif name == 'sgd':
      core = optax.chain(optax.add_decayed_weights(config.weight_decay, _decay_mask),
                         optax.sgd(learning_rate, momentum=config.momentum, nesterov=True))
    else:
      raise ValueError(f"config.optim.name: expected 'adamw', 'lamb' or 'sgd', got {name!r}")
    if config.grad_clip_norm and config.grad_clip_norm > 0:
      return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core)
    return core

  return build(learning_rate=schedule)
