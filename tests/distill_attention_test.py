"""Spatial maps, resolution alignment and attention transfer against NumPy re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.gradcheck import finite_difference_grad

from kdflax.distill import attention


def _swin_partition_ids(batch, height, width, window, shift):
  """Original token id at every (window, slot), built like Swin's forward pass in NumPy.

  Ids are `b * H * W + row * W + col`; -1 marks padding. Swin rolls by -shift, pads at the
  bottom/right to a multiple of the window and partitions row-major, batch outermost.
  """
  ids = np.arange(batch * height * width).reshape(batch, height, width)
  ids = np.roll(ids, (-shift, -shift), axis=(1, 2))
  n_h, n_w = -(-height // window), -(-width // window)
  padded = -np.ones((batch, n_h * window, n_w * window), int)
  padded[:, :height, :width] = ids
  windows = padded.reshape(batch, n_h, window, n_w, window).transpose(0, 1, 3, 2, 4)
  return windows.reshape(batch * n_h * n_w, window * window)


@pytest.mark.parametrize('height,width,window,shift', [(8, 8, 4, 0), (8, 12, 4, 2), (6, 9, 4, 1)])
def test_window_attention_map_merges_windows_and_undoes_the_shift(height, width, window, shift):
  batch, heads = 2, 3
  rng = np.random.default_rng(1)
  slots = _swin_partition_ids(batch, height, width, window, shift)
  attn = rng.random((len(slots), heads, window * window, window * window))
  received = attn.mean(axis=(1, 2))                        # (B * nW, N): per key slot
  want = np.zeros(batch * height * width)
  valid = slots >= 0
  want[slots[valid]] = received[valid]
  got = attention.window_attention_map(jnp.asarray(attn), (height, width, window, shift))
  np.testing.assert_allclose(got, want.reshape(batch, height, width), rtol=1e-6)


def test_window_attention_map_puts_a_known_receiver_at_its_image_position():
  # Every query of every head attends only to the token that sits at image position
  # (5, 2) of image 1 (in its window); all other windows attend uniformly.
  batch, height, width, window, shift = 2, 8, 8, 4, 2
  slots = _swin_partition_ids(batch, height, width, window, shift)
  target = 1 * height * width + 5 * width + 2
  attn = np.full((len(slots), 2, 16, 16), 1 / 16)
  win, slot = np.argwhere(slots == target)[0]
  attn[win] = 0.0
  attn[win, :, :, slot] = 1.0
  got = np.asarray(attention.window_attention_map(jnp.asarray(attn),
                                                  (height, width, window, shift)))
  assert got[1, 5, 2] == pytest.approx(1.0)
  assert np.unravel_index(np.argmax(got), got.shape) == (1, 5, 2)
  others = np.delete(got.reshape(-1), target)
  np.testing.assert_allclose(others[others > 0], 1 / 16, rtol=1e-6)
  assert np.sum(got == 0) == 15                     # the rest of that window receives nothing


def test_window_attention_layout_errors_are_clear():
  with pytest.raises(ValueError, match='windows of 4 x 4 = 16'):
    attention.window_attention_map(jnp.zeros((8, 2, 9, 9)), (8, 8, 4, 0))
  with pytest.raises(ValueError, match='not a multiple of the 2 x 2 windows'):
    attention.window_attention_map(jnp.zeros((7, 2, 16, 16)), (8, 8, 4, 0))


@pytest.mark.parametrize('p', [2.0, 1.0, 3.0])
def test_activation_map_is_mean_abs_power(p):
  features = np.random.default_rng(2).normal(size=(2, 3, 4, 5))
  got = attention.activation_map(jnp.asarray(features), p)
  np.testing.assert_allclose(got, np.mean(np.abs(features) ** p, -1), rtol=1e-5)


def test_tokens_to_grid_drops_prefix_tokens():
  tokens = np.random.default_rng(3).normal(size=(2, 2 + 12, 4)).astype(np.float32)
  got = attention.tokens_to_grid(jnp.asarray(tokens), 2, grid=(3, 4))
  np.testing.assert_array_equal(got, tokens[:, 2:].reshape(2, 3, 4, 4))
  square = attention.tokens_to_grid(jnp.asarray(tokens[:, :10]), 1)
  np.testing.assert_array_equal(square, tokens[:, 1:10].reshape(2, 3, 3, 4))
  with pytest.raises(ValueError, match='12 tokens are not a square grid'):
    attention.tokens_to_grid(jnp.asarray(tokens), 2)


def test_align_to_own_size_is_exactly_unchanged():
  maps = jnp.asarray(np.random.default_rng(4).random((2, 7, 9)), jnp.float32)
  assert attention.align(maps, (7, 9)) is maps
  features = jnp.ones((1, 3, 3, 2))
  assert attention.resize_features(features, (3, 3)) is features


def _box_reference(x, dst):
  """Area downsampling of axis 1 by exact upsampling to the LCM grid, then block means."""
  src = x.shape[1]
  lcm = np.lcm(src, dst)
  fine = np.repeat(x, lcm // src, axis=1)
  return fine.reshape(x.shape[0], dst, lcm // dst, *x.shape[2:]).mean(axis=2)


@pytest.mark.parametrize('src,dst', [(96, 56), (96, 48), (14, 7), (10, 4), (7, 3)])
def test_align_downsampling_is_area_averaging(src, dst):
  maps = np.random.default_rng(5).random((2, src, src))
  want = _box_reference(_box_reference(maps, dst).transpose(0, 2, 1), dst).transpose(0, 2, 1)
  got = attention.align(jnp.asarray(maps), (dst, dst))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got).mean((1, 2)), maps.mean((1, 2)), rtol=1e-5)


@pytest.mark.parametrize('src,dst', [(7, 14), (12, 24), (3, 8)])
def test_align_upsampling_is_half_pixel_bilinear(src, dst):
  maps = np.random.default_rng(6).random((2, src, src)).astype(np.float32)
  want = jax.image.resize(jnp.asarray(maps), (2, dst, dst), 'linear')
  np.testing.assert_allclose(attention.align(jnp.asarray(maps), (dst, dst)), want,
                             rtol=1e-5, atol=1e-6)


def test_align_resizes_each_axis_on_its_own():
  maps = np.random.default_rng(7).random((1, 8, 3)).astype(np.float32)
  got = attention.align(jnp.asarray(maps), (4, 6))
  rows = _box_reference(maps, 4)
  want = jax.image.resize(jnp.asarray(rows), (1, 4, 6), 'linear')
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  features = np.random.default_rng(8).random((1, 8, 3, 2)).astype(np.float32)
  got = attention.resize_features(jnp.asarray(features), (4, 6))
  for c in range(2):
    np.testing.assert_allclose(got[..., c], attention.align(jnp.asarray(features[..., c]),
                                                            (4, 6)), rtol=1e-6)


def test_resize_matrix_rows_sum_to_one():
  for src, dst in ((96, 56), (5, 13), (13, 5), (1, 4), (4, 1)):
    np.testing.assert_allclose(attention.resize_matrix(src, dst).sum(1), 1.0)


def _unit(x):
  x = x.reshape(x.shape[0], -1)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _at_numpy(student, teacher):
  """normalize(mean_c F^2) distance, teacher map block-averaged onto the student grid."""
  q_s = np.mean(student**2, -1)
  q_t = np.mean(teacher**2, -1)
  f = teacher.shape[1] // student.shape[1]
  q_t = q_t.reshape(q_t.shape[0], student.shape[1], f, student.shape[2], f).mean((2, 4))
  return np.mean((_unit(q_s) - _unit(q_t)) ** 2)


def test_at_loss_matches_numpy_for_different_sizes_and_widths():
  rng = np.random.default_rng(9)
  student = rng.normal(size=(3, 7, 7, 5))
  teacher = rng.normal(size=(3, 14, 14, 9))
  got = attention.at_loss(jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(got, _at_numpy(student, teacher), rtol=1e-5)
  # Non-integer ratio: the teacher map goes through the exact area average.
  teacher = rng.normal(size=(3, 12, 12, 4))
  q_t = _box_reference(_box_reference(np.mean(teacher**2, -1), 7).transpose(0, 2, 1), 7)
  want = np.mean((_unit(np.mean(student**2, -1)) - _unit(q_t.transpose(0, 2, 1))) ** 2)
  np.testing.assert_allclose(attention.at_loss(jnp.asarray(student), jnp.asarray(teacher)),
                             want, rtol=1e-5)


def test_at_loss_is_zero_for_matching_attention_and_ignores_scale_and_width():
  rng = np.random.default_rng(10)
  student = jnp.asarray(rng.normal(size=(2, 6, 6, 4)))
  assert float(attention.at_loss(student, student)) < 1e-12
  # A teacher at twice the resolution whose 2x2 blocks repeat the student, scaled and with
  # its channels duplicated, has the same normalised attention map.
  teacher = jnp.repeat(jnp.repeat(3.0 * student, 2, axis=1), 2, axis=2)
  teacher = jnp.concatenate([teacher, teacher], axis=-1)
  assert float(attention.at_loss(student, teacher)) < 1e-12
  other = jnp.asarray(rng.normal(size=(2, 12, 12, 8)))
  assert float(attention.at_loss(student, other)) > 1e-3


def test_at_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(11)
  student = rng.normal(size=(2, 3, 3, 2))
  teacher = rng.normal(size=(2, 5, 5, 3))
  mask = np.array([1.0, 0.5])
  with jax.enable_x64(True):
    f = jax.jit(lambda s: attention.at_loss(s, jnp.asarray(teacher), mask=jnp.asarray(mask)))
    auto = np.asarray(jax.grad(f)(jnp.asarray(student)))
    fd = finite_difference_grad(f, student)
  np.testing.assert_allclose(auto, fd, rtol=1e-6, atol=1e-9)
  assert np.abs(auto).max() > 1e-3


def test_map_distance_softmax_is_kl_of_spatial_softmaxes():
  rng = np.random.default_rng(12)
  s, t = rng.random((2, 3, 4)), rng.random((2, 3, 4))

  def softmax(x, tau):
    e = np.exp(x.reshape(2, -1) / tau)
    return e / e.sum(1, keepdims=True)

  p_s, p_t = softmax(s, 0.5), softmax(t, 0.5)
  want = np.mean(np.sum(p_t * np.log(p_t / p_s), 1))
  got = attention.map_distance(jnp.asarray(s), jnp.asarray(t), 'softmax', 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(attention.map_distance(jnp.asarray(t), jnp.asarray(t), 'softmax', 0.5)) == 0
  with pytest.raises(ValueError, match='normalize must be one of'):
    attention.map_distance(jnp.asarray(s), jnp.asarray(t), 'cosine')
  with pytest.raises(ValueError, match='align them first'):
    attention.map_distance(jnp.asarray(s), jnp.asarray(t[:, :2]))


def test_attention_loss_is_the_weighted_sum_of_aligned_distances():
  rng = np.random.default_rng(13)
  student = {'a': rng.random((2, 4, 4)), 'b': rng.random((2, 2, 2))}
  teacher = {'a': rng.random((2, 8, 8)), 'b': rng.random((2, 2, 2))}
  weights = {'a': 2.0, 'b': 0.5}
  total, terms = attention.attention_loss(
      {k: jnp.asarray(v) for k, v in student.items()},
      {k: jnp.asarray(v) for k, v in teacher.items()}, weights)
  t_a = teacher['a'].reshape(2, 4, 2, 4, 2).mean((2, 4))
  want_a = 2.0 * np.mean((_unit(student['a']) - _unit(t_a)) ** 2)
  want_b = 0.5 * np.mean((_unit(student['b']) - _unit(teacher['b'])) ** 2)
  np.testing.assert_allclose(terms['a'], want_a, rtol=1e-5)
  np.testing.assert_allclose(terms['b'], want_b, rtol=1e-5)
  np.testing.assert_allclose(total, want_a + want_b, rtol=1e-5)


def test_channel_adapters_project_student_width_to_teacher_width():
  adapters = attention.ChannelAdapters((('s1', 6), ('s2', 3)))
  x = {'s1': jnp.ones((2, 4, 4, 5)), 's2': jnp.ones((2, 9, 2))}
  params = adapters.init(jax.random.key(0), x)['params']
  assert params['s1']['proj']['kernel'].shape == (5, 6)
  assert params['s2']['proj']['kernel'].shape == (2, 3)
  out = adapters.apply({'params': params}, x)
  assert out['s1'].shape == (2, 4, 4, 6) and out['s2'].shape == (2, 9, 3)
  p = params['s1']['proj']
  np.testing.assert_allclose(out['s1'], x['s1'] @ p['kernel'] + p['bias'], rtol=1e-6)
