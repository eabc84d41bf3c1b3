"""One jitted train step and eval step, sharded over a `jax.sharding.Mesh`.

    mesh = data_mesh()                                   # every device on axis 'data'
    train_step = make_train_step(student, teacher, loss_fn, mesh)
    state, metrics = train_step(state, teacher_variables, batch)

Data parallelism is expressed with shardings only: the batch is split on the mesh's 'data'
axis, the state and the teacher are replicated, and XLA inserts the gradient all-reduce (and
the cross-device BatchNorm statistics), so N devices compute what 1 device computes on the same
global batch. The state buffers are donated: the old state is invalid after a step.

`loss_fn` is the objective (see `kdflax.distill.objective`), called as

    loss, terms = loss_fn(adapter_params, student_logits, student_intermediates,
                          teacher_logits, teacher_intermediates, labels,
                          step=step, rng=key, mask=mask)

with logits `(B, K)`, intermediates as sown by the models (`{'stage0': (array,), ...}`),
integer labels `(B,)` and `mask` `(B,)` (1 for real examples); batches from mixup/CutMix add
`soft_labels=` `(B, K)`. `teacher_logits` is None and
`teacher_intermediates` is `{}` when there is no teacher (teacher fine-tuning, baseline).

Trained from a teacher cache (`cached_teacher=True`, no teacher module), the step reads the
teacher's outputs from the batch instead: `teacher_logits` `(B, K)` and, per pair of the
objective, `teacher_target:<term>/<pair>` (what `Objective.teacher_targets` returns), and
passes the latter as `teacher_targets=` to `loss_fn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdflax.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
DATA_AXIS = 'data'
# Batch keys of a cached teacher's outputs (kdflax.train.teacher_cache).
TEACHER_LOGITS = 'teacher_logits'
TEACHER_TARGET_PREFIX = 'teacher_target:'


def data_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes) named 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of `mesh` (replicated), as global arrays.

  Place the train state and the teacher variables with this before the first step: the step
  returns replicated arrays, and giving it the same placement from the start keeps it to a
  single compilation. Works with several processes (each passes the same host values).
  """
  sharding = replicated(mesh)

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(place, tree)


def teacher_forward(teacher: nn.Module | None, teacher_variables: Any, batch: Batch,
                    need_intermediates: bool = True) -> tuple[jax.Array | None, dict]:
  """Eval-mode teacher logits and intermediates, outside the gradient.

  The teacher reads `batch['teacher_image']` when the pipeline made one (its own
  resolution), else `batch['image']`.
  """
  if teacher is None:
    return None, {}
  images = batch.get('teacher_image', batch['image'])
  if need_intermediates:
    logits, state = teacher.apply(teacher_variables, images, train=False,
                                  mutable=['intermediates'])
    inter = state['intermediates']
  else:
    logits, inter = teacher.apply(teacher_variables, images, train=False), {}
  return jax.lax.stop_gradient((logits, inter))


def cached_teacher_outputs(batch: Batch) -> tuple[jax.Array | None, dict[str, jax.Array]]:
  """`(teacher_logits (B, K) or None, {'<term>/<pair>': target})` carried by a batch."""
  n = len(TEACHER_TARGET_PREFIX)
  targets = {k[n:]: v for k, v in batch.items() if k.startswith(TEACHER_TARGET_PREFIX)}
  return batch.get(TEACHER_LOGITS), targets


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  k = min(k, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _teacher_outputs(teacher: nn.Module | None, teacher_variables: Any, batch: Batch,
                     teacher_intermediates: bool, cached_teacher: bool
                     ) -> tuple[jax.Array | None, dict, dict[str, Any]]:
  """`(teacher logits, teacher intermediates, extra loss_fn keywords)` of a batch.

  From the batch when `cached_teacher` (the targets go to `loss_fn` as `teacher_targets=`),
  else from running the teacher.
  """
  if cached_teacher:
    t_logits, targets = cached_teacher_outputs(batch)
    return t_logits, {}, {'teacher_targets': targets}
  t_logits, t_inter = teacher_forward(teacher, teacher_variables, batch, teacher_intermediates)
  return t_logits, t_inter, {}


def _apply_gradients(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
  """The optimizer update and the EMA of the student's parameters; step + 1."""
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if state.ema_decay > 0:
    decay = state.ema_decay
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                              state.ema_params, params['student'])
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state, ema_params=ema_params)


def _step_metrics(loss: jax.Array, terms: Mapping[str, jax.Array], logits: jax.Array,
                  labels: jax.Array, mask: jax.Array, grads: Any, new_state: TrainState
                  ) -> dict[str, jax.Array]:
  """`loss`, the terms, masked batch `top1`, `grad_norm`, `param_norm` and `learning_rate`."""
  denom = jnp.maximum(mask.sum(), 1.0)
  metrics = {'loss': loss, **terms,
             'top1': (_topk_correct(logits, labels, 1) * mask).sum() / denom,
             'grad_norm': optax.global_norm(grads['student']),
             # The NaN guard reads this too: an update can overflow the weights while the
             # loss it was computed from is still finite.
             'param_norm': optax.global_norm(new_state.params['student'])}
  lr = _learning_rate(new_state.opt_state)
  if lr is not None:
    metrics['learning_rate'] = lr
  return metrics


def make_train_step(student: nn.Module, teacher: nn.Module | None, loss_fn: LossFn,
                    mesh: Mesh, teacher_intermediates: bool = True,
                    jit: bool = True, cached_teacher: bool = False
                    ) -> Callable[[TrainState, Any, Batch],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, teacher_variables, batch) -> (state, metrics)`.

  Args:
    student: the model being trained (a student, or the teacher during fine-tuning).
    teacher: frozen teacher (eval mode, no gradient) or None.
    loss_fn: the objective, see the module docstring.
    mesh: a mesh with a 'data' axis; the batch's leading axis must divide by its size.
    teacher_intermediates: False skips sowing in the teacher (logit-only objectives).
    jit: False returns the plain function (for tests that inspect tracing).
    cached_teacher: the teacher's outputs come with the batch (`teacher_logits`,
      `teacher_target:*`, see the module docstring); `teacher` must be None.

  Returns:
    The step. `metrics` holds `loss`, every term of `loss_fn`, `top1` (batch accuracy on
    `label`), `grad_norm`, `param_norm` (after the update) and `learning_rate` when the
    optimizer exposes it, as scalars.
  """
  if cached_teacher and teacher is not None:
    raise ValueError('make_train_step: cached_teacher=True reads the teacher from the batch; '
                     'pass teacher=None')

  def step_fn(state: TrainState, teacher_variables: Any, batch: Batch):
    key = state.key()
    dropout_key, loss_key = jax.random.split(key)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    t_logits, t_inter, cached = _teacher_outputs(teacher, teacher_variables, batch,
                                                 teacher_intermediates, cached_teacher)

    def compute_loss(params):
      variables = {'params': params['student']}
      mutable = ['intermediates']
      if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
        mutable.append('batch_stats')
      logits, new_state = student.apply(variables, batch['image'], train=True,
                                        rngs={'dropout': dropout_key}, mutable=mutable)
      extra = {'soft_labels': batch['soft_label']} if 'soft_label' in batch else {}
      loss, terms = loss_fn(params['adapters'], logits, new_state['intermediates'],
                            t_logits, t_inter, labels, step=state.step, rng=loss_key,
                            mask=mask, **extra, **cached)
      return loss, (terms, new_state.get('batch_stats', {}), logits)

    (loss, (terms, batch_stats, logits)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    new_state = _apply_gradients(state, grads, batch_stats)
    return new_state, _step_metrics(loss, terms, logits, labels, mask, grads, new_state)

  if not jit:
    return step_fn
  return jax.jit(step_fn,
                 in_shardings=(replicated(mesh), replicated(mesh), batch_sharding(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)),
                 donate_argnums=(0,))


def _learning_rate(opt_state: Any) -> jax.Array | None:
  """The current learning rate, if the optimizer was built with `optax.inject_hyperparams`."""
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, 'hyperparams')):
    if hasattr(leaf, 'hyperparams') and 'learning_rate' in leaf.hyperparams:
      return leaf.hyperparams['learning_rate']
  return None


def make_eval_step(model: nn.Module, mesh: Mesh, jit: bool = True
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Builds `eval_step(variables, batch) -> sums` over the real (mask == 1) examples.

  Returns sums, not means (`count`, `loss`, `top1`, `top5`), so the caller can add them over
  batches and divide once: padding never biases the result.
  """

  def eval_fn(variables: Any, batch: Batch) -> dict[str, jax.Array]:
    logits = model.apply(variables, batch['image'], train=False).astype(jnp.float32)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'count': mask.sum(), 'loss': (nll * mask).sum(),
            'top1': (_topk_correct(logits, labels, 1) * mask).sum(),
            'top5': (_topk_correct(logits, labels, 5) * mask).sum()}

  if not jit:
    return eval_fn
  return jax.jit(eval_fn, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                 out_shardings=replicated(mesh))
