"""Logit losses against NumPy re-derivations, finite differences and their identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.gradcheck import finite_difference_grad

from kdflax.distill import losses


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _check_grad(f, x, rtol=1e-6, atol=1e-8):
  with jax.enable_x64(True):
    x = np.asarray(x, np.float64)
    auto = np.asarray(jax.grad(f)(jnp.asarray(x)))
    np.testing.assert_allclose(auto, finite_difference_grad(f, x), rtol=rtol, atol=atol)
    assert np.abs(auto).max() > 1e-4  # not a trivially flat function


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  student = rng.normal(size=(4, 5)) * 2
  teacher = rng.normal(size=(4, 5)) * 2
  labels = np.array([0, 3, 1, 4])
  return student, teacher, labels


def test_cross_entropy_matches_numpy_with_smoothing_and_mask(batch):
  student, _, labels = batch
  eps = 0.1
  targets = np.eye(5)[labels] * (1 - eps) + eps / 5
  per_example = -np.sum(targets * np.log(_softmax(student)), -1)
  got = losses.cross_entropy(jnp.asarray(student), jnp.asarray(labels), eps)
  np.testing.assert_allclose(got, per_example.mean(), rtol=1e-6)
  mask = np.array([1.0, 0.0, 1.0, 0.0])
  got = losses.cross_entropy(jnp.asarray(student), jnp.asarray(labels), eps, jnp.asarray(mask))
  np.testing.assert_allclose(got, per_example[[0, 2]].mean(), rtol=1e-6)


def test_cross_entropy_minimum_is_target_entropy(batch):
  _, _, labels = batch
  eps = 0.2
  targets = np.eye(5)[labels] * (1 - eps) + eps / 5
  with jax.enable_x64(True):
    best = jnp.log(jnp.asarray(targets))
    f = lambda z: losses.cross_entropy(z, jnp.asarray(labels), eps)
    entropy = -np.sum(targets * np.log(targets), -1).mean()
    np.testing.assert_allclose(f(best), entropy, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(f)(best), 0.0, atol=1e-12)
    assert f(best + 0.1 * jnp.asarray(batch[0])) > f(best)


def test_cross_entropy_gradient_matches_finite_differences(batch):
  student, _, labels = batch
  mask = jnp.array([1.0, 1.0, 0.0, 1.0])
  _check_grad(lambda z: losses.cross_entropy(z, jnp.asarray(labels), 0.1, mask), student)


def test_masked_examples_change_neither_value_nor_gradient(batch):
  student, teacher, labels = batch
  mask = jnp.array([1.0, 1.0, 0.0, 0.0])
  f = lambda z: losses.kd_loss(z, jnp.asarray(teacher), 2.0, mask)
  g = jax.grad(f)(jnp.asarray(student))
  np.testing.assert_allclose(g[2:], 0.0)
  np.testing.assert_allclose(f(jnp.asarray(student)),
                             losses.kd_loss(jnp.asarray(student[:2]), jnp.asarray(teacher[:2]),
                                            2.0), rtol=1e-6)


def test_masked_mean_rejects_a_misshaped_mask():
  with pytest.raises(ValueError, match=r'mask must have shape \(3,\)'):
    losses.masked_mean(jnp.ones(3), jnp.ones(4))


@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_kd_is_t_squared_kl_of_tempered_softmaxes(batch, temperature):
  student, teacher, _ = batch
  want = temperature**2 * _kl(_softmax(teacher / temperature),
                              _softmax(student / temperature)).mean()
  got = losses.kd_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_kd_is_zero_when_student_equals_teacher_up_to_a_shift(batch):
  _, teacher, _ = batch
  t = jnp.asarray(teacher)
  assert float(losses.kd_loss(t, t, 3.0)) == 0.0        # computed from log-probabilities
  assert abs(float(losses.kd_loss(t + 5.0, t, 3.0))) < 1e-5
  np.testing.assert_allclose(jax.grad(losses.kd_loss)(t, t, 3.0), 0.0, atol=1e-7)


def test_kd_t_squared_keeps_the_high_temperature_gradient_at_logit_matching(batch):
  # Hinton et al.: with zero-mean logits and T >> |z|, d(T^2 KL)/dz_s -> (z_s - z_t) / K,
  # independent of T. Without the T^2 factor it would shrink like 1 / T^2.
  student, teacher, _ = batch
  s = student - student.mean(-1, keepdims=True)
  t = teacher - teacher.mean(-1, keepdims=True)
  with jax.enable_x64(True):
    grad = jax.grad(losses.kd_loss)(jnp.asarray(s), jnp.asarray(t), 1000.0)
  np.testing.assert_allclose(grad, (s - t) / 5 / len(s), rtol=1e-2, atol=3e-4)  # O(1/T)


def test_kd_gradient_matches_finite_differences(batch):
  student, teacher, _ = batch
  _check_grad(lambda z: losses.kd_loss(z, jnp.asarray(teacher, z.dtype), 3.0), student)


def test_multi_teacher_averages_probabilities(batch):
  student, teacher, _ = batch
  other = teacher[::-1] * 0.5
  avg = (_softmax(teacher / 2) + _softmax(other / 2)) / 2
  np.testing.assert_allclose(
      losses.teacher_probabilities([jnp.asarray(teacher), jnp.asarray(other)], 2.0), avg,
      rtol=1e-6)
  got = losses.kd_loss(jnp.asarray(student), [jnp.asarray(teacher), jnp.asarray(other)], 2.0)
  np.testing.assert_allclose(got, 4 * _kl(avg, _softmax(student / 2)).mean(), rtol=1e-5)
  same = losses.kd_loss(jnp.asarray(student), (jnp.asarray(teacher),) * 3, 2.0)
  np.testing.assert_allclose(same, losses.kd_loss(jnp.asarray(student), jnp.asarray(teacher),
                                                  2.0), rtol=1e-6)


def test_multi_teacher_rejects_empty_and_mismatched_teachers(batch):
  student, teacher, _ = batch
  with pytest.raises(ValueError, match='empty sequence'):
    losses.kd_loss(jnp.asarray(student), [], 2.0)
  with pytest.raises(ValueError, match='one shape'):
    losses.kd_loss(jnp.asarray(student), [jnp.asarray(teacher), jnp.asarray(teacher[:2])], 2.0)
  with pytest.raises(ValueError, match='same'):
    losses.kd_loss(jnp.asarray(student[:, :3]), jnp.asarray(teacher), 2.0)


def _dkd_numpy(student, teacher, labels, temperature):
  p_s, p_t = _softmax(student / temperature), _softmax(teacher / temperature)
  rows = np.arange(len(labels))
  pt_s, pt_t = p_s[rows, labels], p_t[rows, labels]
  b_s, b_t = np.stack([pt_s, 1 - pt_s], -1), np.stack([pt_t, 1 - pt_t], -1)
  tckd = _kl(b_t, b_s)
  keep = np.ones_like(p_s, bool)
  keep[rows, labels] = False
  hat_s = p_s[keep].reshape(len(labels), -1) / (1 - pt_s)[:, None]
  hat_t = p_t[keep].reshape(len(labels), -1) / (1 - pt_t)[:, None]
  return tckd, _kl(hat_t, hat_s), pt_t


def test_dkd_parts_match_numpy_re_derivation(batch):
  student, teacher, labels = batch
  want = _dkd_numpy(student, teacher, labels, 2.0)
  with jax.enable_x64(True):
    got = losses.dkd_parts(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), 2.0)
    for part, ref in zip(got, want, strict=True):
      np.testing.assert_allclose(part, ref, rtol=1e-10)
  got = losses.dkd_parts(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                         jnp.asarray(labels), 2.0)
  for part, ref in zip(got, want, strict=True):
    np.testing.assert_allclose(part, ref, rtol=1e-4, atol=1e-6)
  got = losses.dkd_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels),
                        alpha=0.7, beta=3.0, temperature=2.0)
  np.testing.assert_allclose(got, 4 * (0.7 * want[0] + 3.0 * want[1]).mean(), rtol=1e-5)


def test_dkd_recombines_to_kd(batch):
  # The decomposition: KL(p_t || p_s) = TCKD + (1 - p_t,y) * NCKD, per example. So KD equals
  # DKD with alpha = 1 and beta replaced per example by (1 - p_t,y), and DKD(alpha=1, beta=1)
  # bounds KD from above (NCKD >= 0).
  student, teacher, labels = batch
  s, t, y = jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels)
  for temperature in (1.0, 4.0):
    tckd, nckd, pt = losses.dkd_parts(s, t, y, temperature)
    np.testing.assert_allclose(temperature**2 * jnp.mean(tckd + (1 - pt) * nckd),
                               losses.kd_loss(s, t, temperature), rtol=1e-5)
    assert losses.dkd_loss(s, t, y, 1.0, 1.0, temperature) >= losses.kd_loss(s, t, temperature)


def test_dkd_is_zero_at_the_teacher_and_stable_for_confident_teachers(batch):
  student, teacher, labels = batch
  t, y = jnp.asarray(teacher), jnp.asarray(labels)
  assert float(losses.dkd_loss(t, t, y, 1.0, 8.0, 4.0)) == 0.0
  np.testing.assert_allclose(jax.grad(losses.dkd_loss)(t, t, y, 1.0, 8.0, 4.0), 0.0, atol=2e-6)
  confident = jnp.asarray(np.eye(5)[labels] * 200.0)
  value, grad = jax.value_and_grad(losses.dkd_loss)(jnp.asarray(student), confident, y,
                                                     1.0, 8.0, 1.0)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_dkd_gradient_matches_finite_differences(batch):
  student, teacher, labels = batch
  _check_grad(lambda z: losses.dkd_loss(z, jnp.asarray(teacher, z.dtype), jnp.asarray(labels),
                                        1.0, 8.0, 2.0), student)


def test_dkd_warmup_is_linear_then_flat(batch):
  student, teacher, labels = batch
  args = (jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), 1.0, 2.0, 2.0)
  full = losses.dkd_loss(*args)
  for step, factor in ((0, 0.0), (5, 0.25), (20, 1.0), (100, 1.0)):
    np.testing.assert_allclose(losses.dkd_loss(*args, step=step, warmup_steps=20),
                               factor * full, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(jax.jit(losses.dkd_warmup, static_argnums=1)(jnp.int32(10), 40),
                             0.25)


def test_hard_distillation_is_ce_against_teacher_argmax(batch):
  student, teacher, _ = batch
  argmax = teacher.argmax(-1)
  want = -np.log(_softmax(student)[np.arange(4), argmax]).mean()
  got = losses.hard_distillation_loss(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Minimised by a student that agrees with the teacher's argmax with a large margin.
  confident = jnp.asarray(np.eye(5)[argmax] * 30.0)
  assert float(losses.hard_distillation_loss(confident, jnp.asarray(teacher))) < 1e-10
  _check_grad(lambda z: losses.hard_distillation_loss(z, jnp.asarray(teacher, z.dtype)), student)


def test_hard_distillation_multi_teacher_uses_argmax_of_averaged_probabilities():
  a = jnp.log(jnp.array([[0.5, 0.4, 0.1]]))
  b = jnp.log(jnp.array([[0.1, 0.4, 0.5]]))
  np.testing.assert_array_equal(losses.teacher_argmax([a, b]), [1])   # neither teacher's own


def test_deit_distillation_token_loss(batch):
  student, teacher, labels = batch
  dist = student[::-1].copy()
  rows = np.arange(4)
  want = (0.5 * -np.log(_softmax(student)[rows, labels]).mean()
          + 0.5 * -np.log(_softmax(dist)[rows, teacher.argmax(-1)]).mean())
  got = losses.deit_distillation_loss(jnp.asarray(student), jnp.asarray(dist),
                                      jnp.asarray(teacher), jnp.asarray(labels))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_shapes_are_clear_errors(batch):
  student, teacher, labels = batch
  with pytest.raises(ValueError, match=r'logits must be \(batch, classes\)'):
    losses.cross_entropy(jnp.zeros(5), jnp.asarray(labels))
  with pytest.raises(ValueError, match=r'labels must have shape \(4,\)'):
    losses.cross_entropy(jnp.asarray(student), jnp.zeros((4, 1), jnp.int32))
  with pytest.raises(ValueError, match='labels must have shape'):
    losses.dkd_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels[:2]))


def test_cross_entropy_with_soft_targets_matches_numpy():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  lam = rng.uniform(size=(4, 1)).astype(np.float32)
  a, b = np.eye(5, dtype=np.float32)[[0, 1, 2, 3]], np.eye(5, dtype=np.float32)[[4, 0, 1, 2]]
  soft = lam * a + (1 - lam) * b                                  # mixup targets
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = float(np.mean(-(soft * log_p).sum(-1)))
  np.testing.assert_allclose(float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(soft))),
                             expected, rtol=1e-5)
  # One-hot soft targets are the integer-label loss.
  np.testing.assert_allclose(
      float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(a))),
      float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray([0, 1, 2, 3]))), rtol=1e-6)
  with pytest.raises(ValueError, match='soft targets'):
    losses.cross_entropy(jnp.asarray(logits), jnp.zeros((4, 3)))
