"""Logit losses: cross-entropy, logit KD, decoupled KD (DKD), DeiT hard-label KD.

All functions are pure functions of arrays and return a scalar: the (masked) mean over the
batch, computed in float32 (float64 inputs stay float64; bfloat16 is upcast). Shapes: logits
`(B, K)`, integer labels `(B,)`, optional `mask` `(B,)` (1 for real examples, 0 for the
padding that fills a last eval batch). With a mask the mean is
`sum_b mask_b * loss_b / max(sum_b mask_b, 1)`, so padded examples contribute nothing.

Wherever a function takes `teacher_logits` it also accepts a sequence of `(B, K)` arrays, one
per teacher (multi-teacher distillation): the target is then the average of the teachers'
probabilities at the same temperature (`teacher_probabilities`).

Formulas (per example, `p = softmax(z / T)`):

    ce      = -sum_k q_k log softmax(z_s)_k,  q = (1 - eps) onehot(y) + eps / K
    kd      = T^2 * KL(p_t || p_s) = T^2 * sum_k p_t,k (log p_t,k - log p_s,k)
    dkd     = warmup(step) * T^2 * (alpha * TCKD + beta * NCKD)          (Zhao et al., 2022)
              TCKD = KL(b_t || b_s),   b = [p_y, 1 - p_y]                  (target vs rest)
              NCKD = KL(p^_t || p^_s), p^_k = p_k / (1 - p_y) for k != y   (among non-targets)
              KL(p_t || p_s) = TCKD + (1 - p_t,y) * NCKD exactly, so plain KD is DKD with
              alpha = 1 and beta = 1 - p_t,y (per example).
    hard    = ce(z_s, argmax_k z_t)                                       (DeiT hard distillation)
    deit    = 0.5 * ce(z_cls, y) + 0.5 * ce(z_dist, argmax_k z_t)         (distillation token)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
TeacherLogits = Array | Sequence[Array]


def upcast(x: Array) -> Array:
  """`x` as float32 at least (float64 stays float64, bfloat16 and integers become float32)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(values: Array, mask: Array | None = None) -> Array:
  """Mean of per-example `values` `(B,)` over the examples where `mask` `(B,)` is nonzero."""
  values = upcast(values)
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask, values.dtype)
  if mask.shape != values.shape:
    raise ValueError(f'mask must have shape {values.shape} (one entry per example), '
                     f'got {mask.shape}')
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_logits(name: str, logits: Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f'{name} must be (batch, classes), got shape {logits.shape}')


def teacher_log_probabilities(teacher_logits: TeacherLogits, temperature: float = 1.0
                              ) -> Array:
  """`log softmax(z_t / T)` `(B, K)`; for a sequence of teachers, the log of their average
  probabilities (`logsumexp_i log p_i - log n`, so it stays finite and exact)."""
  if isinstance(teacher_logits, (list, tuple)):
    if not teacher_logits:
      raise ValueError('teacher_logits is an empty sequence; expected at least one teacher')
    for i, logits in enumerate(teacher_logits):
      _check_logits(f'teacher_logits[{i}]', logits)
    shapes = {tuple(logits.shape) for logits in teacher_logits}
    if len(shapes) != 1:
      raise ValueError(f'all teachers must give logits of one shape, got {sorted(shapes)}')
    if len(teacher_logits) == 1:
      return teacher_log_probabilities(teacher_logits[0], temperature)
    log_probs = jnp.stack([jax.nn.log_softmax(upcast(logits) / temperature, axis=-1)
                           for logits in teacher_logits])
    return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(float(len(teacher_logits)))
  _check_logits('teacher_logits', teacher_logits)
  return jax.nn.log_softmax(upcast(teacher_logits) / temperature, axis=-1)


def teacher_probabilities(teacher_logits: TeacherLogits, temperature: float = 1.0) -> Array:
  """Soft targets `softmax(z_t / T)` `(B, K)`; for a sequence of teachers, their average."""
  return jnp.exp(teacher_log_probabilities(teacher_logits, temperature))


def _check_pair(student_logits: Array, teacher_probs: Array) -> None:
  _check_logits('student_logits', student_logits)
  if student_logits.shape != teacher_probs.shape:
    raise ValueError(f'student logits {student_logits.shape} and teacher logits '
                     f'{teacher_probs.shape} must have the same (batch, classes) shape')


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0,
                  mask: Array | None = None) -> Array:
  """Softmax cross-entropy of `(B, K)` logits against integer labels `(B,)`.

  `labels` may also be soft targets `(B, K)` (rows summing to 1, e.g. from mixup/CutMix).
  With `label_smoothing = eps` the target is `(1 - eps) * target + eps / K`; its minimum over
  the logits is the entropy of that target (0 without smoothing).
  """
  _check_logits('logits', logits)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(upcast(logits), axis=-1)
  if labels.shape == logits.shape:
    targets = labels.astype(log_probs.dtype)
  elif labels.shape == logits.shape[:1]:
    targets = jax.nn.one_hot(labels, num_classes, dtype=log_probs.dtype)
  else:
    raise ValueError(f'labels must have shape {logits.shape[:1]} (classes) or {logits.shape} '
                     f'(soft targets), got {labels.shape}')
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  return masked_mean(-jnp.sum(targets * log_probs, axis=-1), mask)


def kl_per_example(teacher_log_probs: Array, student_log_probs: Array) -> Array:
  """`KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k)` per row `(B,)`, `0 log 0 = 0`.

  Taking log-probabilities makes the value exactly 0 when the two distributions agree.
  """
  teacher_probs = jnp.exp(teacher_log_probs)
  terms = teacher_probs * (teacher_log_probs - student_log_probs)
  return jnp.sum(jnp.where(teacher_probs > 0, terms, 0.0), axis=-1)


def kd_loss(student_logits: Array, teacher_logits: TeacherLogits, temperature: float,
            mask: Array | None = None) -> Array:
  """Hinton KD: `T^2 * mean_b KL(softmax(z_t / T) || softmax(z_s / T))`, a scalar.

  The `T^2` factor keeps the gradient magnitude independent of the temperature. Zero iff the
  student's tempered distribution equals the teacher's (the averaged one for a sequence).
  """
  teacher_log_probs = teacher_log_probabilities(teacher_logits, temperature)
  _check_pair(student_logits, teacher_log_probs)
  student_log_probs = jax.nn.log_softmax(upcast(student_logits) / temperature, -1)
  kl = kl_per_example(teacher_log_probs, student_log_probs)
  return temperature**2 * masked_mean(kl, mask)


def dkd_parts(student_logits: Array, teacher_logits: TeacherLogits, labels: Array,
              temperature: float) -> tuple[Array, Array, Array]:
  """Per-example `(TCKD, NCKD, p_t,y)`, each `(B,)`, unscaled (no `T^2`, no weights).

  TCKD is the KL between the binary (target, non-target) distributions, NCKD the KL between
  the distributions renormalised over the non-target classes; `p_t,y` is the teacher's tempered
  probability of the label. `KL(p_t || p_s) = TCKD + (1 - p_t,y) * NCKD` holds exactly.
  """
  teacher_log_probs = teacher_log_probabilities(teacher_logits, temperature)
  _check_pair(student_logits, teacher_log_probs)
  if labels.shape != student_logits.shape[:1]:
    raise ValueError(f'labels must have shape {student_logits.shape[:1]}, got {labels.shape}')
  if student_logits.shape[-1] < 2:
    raise ValueError('DKD needs at least 2 classes (a target and a non-target)')
  is_target = jax.nn.one_hot(labels, student_logits.shape[-1], dtype=bool)
  student_log_probs = jax.nn.log_softmax(upcast(student_logits) / temperature, axis=-1)
  t_target, t_rest, t_hat = _split_target(teacher_log_probs, is_target)
  s_target, s_rest, s_hat = _split_target(student_log_probs, is_target)
  p_target, p_rest = jnp.exp(t_target), jnp.exp(t_rest)
  tckd = p_target * (t_target - s_target) + p_rest * (t_rest - s_rest)
  p_hat = jnp.exp(t_hat)
  nckd = jnp.sum(jnp.where(is_target | (p_hat == 0), 0.0, p_hat * (t_hat - s_hat)), axis=-1)
  return tckd, nckd, p_target


def _split_target(log_probs: Array, is_target: Array) -> tuple[Array, Array, Array]:
  """From `(B, K)` log-probabilities: `log p_y`, `log(1 - p_y)` and `log p^` (0 at the target).

  All in log space (`log(1 - p_y)` is a logsumexp over the non-targets), so a confident
  distribution keeps finite, exact values.
  """
  log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
  rest = jnp.where(is_target, -jnp.inf, log_probs)
  log_rest = jax.nn.logsumexp(rest, axis=-1)
  log_hat = jnp.where(is_target, 0.0, rest - log_rest[:, None])
  return log_target, log_rest, log_hat


def dkd_warmup(step: Array | int | None, warmup_steps: int) -> Array:
  """Linear warm-up factor `min(step / warmup_steps, 1)` (1 when there is no warm-up)."""
  if not warmup_steps or step is None:
    return jnp.asarray(1.0, jnp.float32)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / float(warmup_steps), 1.0)


def dkd_loss(student_logits: Array, teacher_logits: TeacherLogits, labels: Array,
             alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
             step: Array | int | None = None, warmup_steps: int = 0,
             mask: Array | None = None) -> Array:
  """Decoupled KD: `warmup(step) * T^2 * mean_b (alpha * TCKD + beta * NCKD)`, a scalar.

  Args:
    student_logits: `(B, K)`.
    teacher_logits: `(B, K)` or a sequence of them (probabilities averaged).
    labels: `(B,)` integer ground truth, which defines the target class.
    alpha, beta: weights of the target-class and non-target-class parts.
    temperature: softmax temperature `T`.
    step, warmup_steps: the loss is scaled by `min(step / warmup_steps, 1)`.
    mask: optional `(B,)` example weights.
  """
  tckd, nckd, _ = dkd_parts(student_logits, teacher_logits, labels, temperature)
  per_example = alpha * tckd + beta * nckd
  return dkd_warmup(step, warmup_steps) * temperature**2 * masked_mean(per_example, mask)


def teacher_argmax(teacher_logits: TeacherLogits) -> Array:
  """Hard teacher labels `(B,)`: argmax of the (averaged, T = 1) teacher probabilities."""
  if isinstance(teacher_logits, (list, tuple)):
    return jnp.argmax(teacher_probabilities(teacher_logits, 1.0), axis=-1)
  _check_logits('teacher_logits', teacher_logits)
  return jnp.argmax(teacher_logits, axis=-1)


def hard_distillation_loss(student_logits: Array, teacher_logits: TeacherLogits,
                           mask: Array | None = None) -> Array:
  """DeiT hard distillation: cross-entropy of the student against the teacher's argmax."""
  labels = jax.lax.stop_gradient(teacher_argmax(teacher_logits))
  if labels.shape != student_logits.shape[:1]:
    raise ValueError(f'student logits {student_logits.shape} and teacher batch '
                     f'{labels.shape} differ')
  return cross_entropy(student_logits, labels, mask=mask)


def deit_distillation_loss(cls_logits: Array, dist_logits: Array, teacher_logits: TeacherLogits,
                           labels: Array, label_smoothing: float = 0.0,
                           mask: Array | None = None) -> Array:
  """Distillation-token student: `0.5 * CE(cls, labels) + 0.5 * CE(dist, argmax teacher)`.

  `label_smoothing` applies to the label half only (DeiT smooths the labels, not the teacher).
  """
  return (0.5 * cross_entropy(cls_logits, labels, label_smoothing, mask)
          + 0.5 * hard_distillation_loss(dist_logits, teacher_logits, mask))
