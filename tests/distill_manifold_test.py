"""Manifold relation terms against a NumPy re-derivation, for mismatched widths and counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.gradcheck import finite_difference_grad

from kdflax.distill import manifold


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _relations_numpy(s, t, idx):
  """The three terms for same-count tokens `(B, N, C_*)`, with explicit random indices."""
  s, t = _unit(s), _unit(t)
  rel = lambda x: x @ np.swapaxes(x, -1, -2)
  intra = np.mean((rel(s) - rel(t)) ** 2)
  inter = np.mean((rel(s.transpose(1, 0, 2)) - rel(t.transpose(1, 0, 2))) ** 2)
  g_s = s.reshape(-1, s.shape[-1])[idx]
  g_t = t.reshape(-1, t.shape[-1])[idx]
  random = np.mean((rel(g_s) - rel(g_t)) ** 2)
  return {'intra': intra, 'inter': inter, 'random': random}


# One compilation per shape instead of op-by-op dispatch.
_terms = jax.jit(manifold.manifold_terms,
                 static_argnames=('num_samples', 'grid', 'student_grid', 'teacher_grid'))


def _indices(key, total, k):
  return np.asarray(jax.random.permutation(key, total)[:k])


def _assert_terms(got, want, rtol=1e-5):
  assert set(got) == {'intra', 'inter', 'random'}
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, err_msg=name)


def test_terms_match_numpy_for_different_widths_and_token_counts():
  rng = np.random.default_rng(0)
  batch, key = 3, jax.random.key(7)
  student = rng.normal(size=(batch, 16, 5))                   # 4 x 4 tokens, width 5
  teacher = rng.normal(size=(batch, 1 + 64, 7))[:, 1:]        # 8 x 8 tokens, width 7
  got = _terms(jnp.asarray(student), jnp.asarray(teacher), key, num_samples=20)
  # The teacher's grid is area-downsampled onto the student's: 2 x 2 block means.
  t_small = teacher.reshape(batch, 4, 2, 4, 2, 7).mean((2, 4)).reshape(batch, 16, 7)
  _assert_terms(got, _relations_numpy(student, t_small, _indices(key, batch * 16, 20)))


def test_cnn_stage_is_h_times_w_tokens():
  rng = np.random.default_rng(1)
  key = jax.random.key(3)
  stage = rng.normal(size=(2, 3, 3, 4))                       # CNN student (B, H, W, C)
  tokens = rng.normal(size=(2, 9, 6))                         # 3 x 3 teacher tokens
  got = _terms(jnp.asarray(stage), jnp.asarray(tokens), key, num_samples=10)
  want = _relations_numpy(stage.reshape(2, 9, 4), tokens, _indices(key, 18, 10))
  _assert_terms(got, want)


def test_grid_choice_resizes_onto_the_requested_grid():
  rng = np.random.default_rng(2)
  student = rng.normal(size=(2, 2, 2, 3))
  teacher = rng.normal(size=(2, 4, 4, 5))
  key = jax.random.key(0)
  got = _terms(jnp.asarray(student), jnp.asarray(teacher), key, num_samples=6, grid='min')
  t_small = teacher.reshape(2, 2, 2, 2, 2, 5).mean((2, 4)).reshape(2, 4, 5)
  _assert_terms(got, _relations_numpy(student.reshape(2, 4, 3), t_small, _indices(key, 8, 6)))
  up = _terms(jnp.asarray(student), jnp.asarray(teacher), key, num_samples=6, grid='teacher')
  s_up = jax.image.resize(jnp.asarray(student), (2, 4, 4, 3), 'linear')
  want = _relations_numpy(np.asarray(s_up).reshape(2, 16, 3), teacher.reshape(2, 16, 5),
                          _indices(key, 32, 6))
  _assert_terms(up, want, rtol=1e-4)


def test_all_samples_give_the_pooled_relation_whatever_the_key():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 6))
  pooled = lambda x: _unit(x.reshape(8, -1)) @ _unit(x.reshape(8, -1)).T
  want = np.mean((pooled(s) - pooled(t)) ** 2)
  for seed in (0, 1):
    got = _terms(jnp.asarray(s), jnp.asarray(t), jax.random.key(seed), num_samples=500)
    np.testing.assert_allclose(got['random'], want, rtol=1e-5)
  a, b, c = (_terms(jnp.asarray(s), jnp.asarray(t), jax.random.key(seed), num_samples=3)
             ['random'] for seed in (0, 1, 0))
  assert float(a) == float(c) and float(a) != float(b)


def test_zero_for_the_same_geometry_in_any_width():
  # Relations are cosine similarities: a rotated, zero-padded, rescaled copy of the student
  # tokens has exactly the student's relations, so every term vanishes. Drawing different
  # indices for teacher and student would make the random term nonzero.
  rng = np.random.default_rng(4)
  student = rng.normal(size=(3, 9, 4))
  rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  teacher = np.concatenate([student @ rotation, np.zeros((3, 9, 3))], -1) * 2.5
  with jax.enable_x64(True):
    got = _terms(jnp.asarray(student), jnp.asarray(teacher), jax.random.key(0), num_samples=8)
  for name, value in got.items():
    assert abs(float(value)) < 1e-15, name
  got = _terms(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
               jax.random.key(0), num_samples=8)
  for name, value in got.items():
    assert abs(float(value)) < 1e-6, name                    # float32 rounding only
  other = _terms(jnp.asarray(student), jnp.asarray(rng.normal(size=(3, 9, 7))),
                 jax.random.key(0), num_samples=8)
  assert all(float(v) > 1e-3 for v in other.values())


@pytest.mark.parametrize('n,c_a,c_b', [(30, 2, 3), (4, 16, 8)])
def test_gram_and_direct_paths_agree(n, c_a, c_b):
  rng = np.random.default_rng(5)
  a, b = _unit(rng.normal(size=(2, n, c_a))), _unit(rng.normal(size=(2, n, c_b)))
  want = np.sum((a @ np.swapaxes(a, 1, 2) - b @ np.swapaxes(b, 1, 2)) ** 2, axis=(1, 2))
  for method in ('direct', 'gram', 'auto'):
    got = manifold._sq_frobenius_of_difference(jnp.asarray(a), jnp.asarray(b), method)
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=method)


def test_masked_examples_do_not_count():
  rng = np.random.default_rng(6)
  s, t = rng.normal(size=(4, 9, 3)), rng.normal(size=(4, 9, 5))
  mask = jnp.array([1.0, 0.0, 1.0, 1.0])
  key = jax.random.key(2)
  base = _terms(jnp.asarray(s), jnp.asarray(t), key, num_samples=12, mask=mask)
  s2, t2 = s.copy(), t.copy()
  s2[1], t2[1] = rng.normal(size=(9, 3)) * 5, rng.normal(size=(9, 5))
  moved = _terms(jnp.asarray(s2), jnp.asarray(t2), key, num_samples=12, mask=mask)
  for name in base:
    np.testing.assert_allclose(moved[name], base[name], rtol=1e-6, err_msg=name)
  keep = [0, 2, 3]
  subset = _relations_numpy(s[keep], t[keep], np.arange(3))
  for name in ('intra', 'inter'):
    np.testing.assert_allclose(base[name], subset[name], rtol=1e-5, err_msg=name)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(7)
  student = rng.normal(size=(2, 4, 3))
  teacher = rng.normal(size=(2, 16, 5))
  with jax.enable_x64(True):
    key = jax.random.key(0)

    def f(s):
      terms = manifold.manifold_terms(s, jnp.asarray(teacher), key, 5)
      return 4.0 * terms['intra'] + 0.1 * terms['inter'] + 0.2 * terms['random']

    f = jax.jit(f)
    auto = np.asarray(jax.grad(f)(jnp.asarray(student)))
    fd = finite_difference_grad(f, student)
  np.testing.assert_allclose(auto, fd, rtol=1e-6, atol=1e-9)
  assert np.abs(auto).max() > 1e-3


def test_bad_inputs_are_clear_errors():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='12 tokens are not a square grid'):
    manifold.manifold_terms(jnp.ones((2, 12, 3)), jnp.ones((2, 16, 3)), key, 4)
  with pytest.raises(ValueError, match='batch sizes differ'):
    manifold.manifold_terms(jnp.ones((2, 16, 3)), jnp.ones((3, 16, 3)), key, 4)
  with pytest.raises(ValueError, match='needs a PRNG key'):
    manifold.manifold_terms(jnp.ones((2, 16, 3)), jnp.ones((2, 16, 3)), None, 4)
  # A non-square count is fine with its grid.
  out = _terms(jnp.ones((2, 12, 3)), jnp.ones((2, 48, 3)), key, num_samples=4,
               student_grid=(3, 4), teacher_grid=(6, 8))
  assert float(out['intra']) == pytest.approx(0.0, abs=1e-10)
