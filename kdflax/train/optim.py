"""Optimizer from a config: warm-up + cosine schedule, weight decay, gradient clipping.

    tx = make_optimizer(config.optim, total_steps)

The keys of `config.optim` and their defaults: `kdflax.config.schema.default_optim_config`.

The learning rate is exposed through `optax.inject_hyperparams`, so the train step can log it.
"""

from __future__ import annotations

import ml_collections
import optax


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
