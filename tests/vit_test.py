"""kdflax.models.vit: MACs, the intermediates contract, train mode, bfloat16.

Everything compared with timm (logits and every block, parameter counts, LayerNorm eps,
mean/std) is in `vit_convert_test.py`, so this file needs no PyTorch.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdflax.models import complexity, create_model

TINY = ('vit_test_patch8_32', 'deit_test_distilled_patch8_32')


def _images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(0, 1, (batch, size, size, 3)).astype(np.float32)


def _init(name: str, **overrides):
  """Module, image size and random float32 variables (NumPy-filled: no init compile)."""
  module, size = create_model(name, num_classes=5, **overrides)
  rng = np.random.default_rng(0)
  fill = lambda a: jnp.asarray(rng.normal(0, 0.2, a.shape).astype(np.float32))
  variables = jax.tree.map(fill, complexity.abstract_variables(module, size))
  return module, size, variables


def test_deit_tiny_macs_match_published_figure():
  module, size = create_model('deit_tiny_patch16_224', num_classes=1000)
  macs = complexity.count_macs(module, complexity.abstract_variables(module, size), size)
  assert abs(macs / 1.26e9 - 1) < 0.02, macs
  # Re-derived by hand: patch conv + 12 x (qkv, q.k, attn.v, proj, fc1, fc2) + head.
  t, c = 197, 192
  per_block = t * c * 3 * c + 2 * t * t * c + t * c * c + 2 * t * c * 4 * c
  assert macs == 196 * c * 16 * 16 * 3 + 12 * per_block + c * 1000


def test_static_layout_on_unbound_module():
  plain, _ = create_model('deit_small_patch16_224', num_classes=3)
  distilled, _ = create_model('deit_small_distilled_patch16_224', num_classes=3)
  big, size = create_model('deit_base_patch16_384', num_classes=3)
  assert (plain.num_prefix_tokens, plain.grid_size) == (1, 14)
  assert (distilled.num_prefix_tokens, distilled.grid_size) == (2, 14)
  assert (big.grid_size, size) == (24, 384)


@pytest.mark.parametrize('name', TINY)
def test_intermediates_contract(name):
  module, size, variables = _init(name)
  assert set(variables) == {'params'}
  x = _images(size)
  plain = module.apply(variables, x)
  logits, state = module.apply(variables, x, mutable=['intermediates'])
  assert plain.dtype == jnp.float32 and plain.shape == (2, 5)
  np.testing.assert_array_equal(plain, logits)
  sown = state['intermediates']
  p, n, c = module.num_prefix_tokens, module.grid_size ** 2, module.embed_dim
  expected = {f'block{i}': (2, p + n, c) for i in range(module.depth)}
  if module.distilled:
    expected.update(cls_logits=(2, 5), dist_logits=(2, 5))
  assert {k: v[0].shape for k, v in sown.items()} == expected
  assert all(isinstance(v, tuple) and len(v) == 1 for v in sown.values())

  # block{last} is the pre-norm token sequence the heads read: final LayerNorm (NumPy, eps
  # 1e-6) + head on token 0 (and head_dist on token 1) reproduces the logits.
  params = jax.tree.map(np.asarray, variables['params'])
  tokens = np.asarray(sown[f'block{module.depth - 1}'][0], np.float64)
  mu, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  normed = (tokens - mu) / np.sqrt(var + 1e-6) * params['norm']['scale'] + params['norm']['bias']
  head = lambda name, tok: normed[:, tok] @ params[name]['kernel'] + params[name]['bias']
  if module.distilled:
    np.testing.assert_allclose(sown['cls_logits'][0], head('head', 0), atol=1e-5)
    np.testing.assert_allclose(sown['dist_logits'][0], head('head_dist', 1), atol=1e-5)
    np.testing.assert_allclose(logits, (head('head', 0) + head('head_dist', 1)) / 2, atol=1e-5)
  else:
    np.testing.assert_allclose(logits, head('head', 0), atol=1e-5)


def test_prefix_tokens_come_first_and_pos_embed_covers_them():
  # Token order is [cls, dist, patches...] and pos_embed has an entry for every token (timm's
  # original DeiT layout): adding to pos_embed[:, 1] is the same as adding to dist_token, and
  # it mostly moves token 1 (the residual carries it; other tokens only see it via attention).
  module, size, variables = _init('deit_test_distilled_patch8_32')
  x = _images(size)
  params = variables['params']
  block0 = lambda p: module.apply({'params': p}, x, mutable=['intermediates'])[1][
      'intermediates']['block0'][0]
  base = block0(params)
  via_pos = block0({**params, 'pos_embed': params['pos_embed'].at[:, 1].add(100.0)})
  via_token = block0({**params, 'dist_token': params['dist_token'] + 100.0})
  np.testing.assert_allclose(via_token, via_pos, rtol=1e-5, atol=1e-4)
  per_token = np.abs(via_pos - base).max(axis=(0, 2))
  assert per_token[1] > 10 * np.delete(per_token, 1).max(), per_token


def test_train_mode_dropout_and_stochastic_depth():
  name = 'deit_test_distilled_patch8_32'
  module, size, variables = _init(name, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.2)
  x = _images(size, batch=4)
  run = jax.jit(lambda seed: module.apply(variables, x, train=True,
                                          rngs={'dropout': jax.random.key(seed)}))
  eval_logits = module.apply(variables, x)
  a, b, c = run(1), run(1), run(2)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, eval_logits)
  with pytest.raises(flax.errors.InvalidRngError):
    module.apply(variables, x, train=True)

  # With every rate 0, train mode is eval mode (and needs no rng).
  quiet, _ = create_model(name, num_classes=5)
  np.testing.assert_array_equal(quiet.apply(variables, x, train=True), eval_logits)

  # Stochastic depth is linear from 0 (first block) to drop_path_rate (last): at rate 1 the
  # last block drops both residual branches, so its output is its input.
  deep, _ = create_model(name, num_classes=5, drop_path_rate=1.0)
  _, state = deep.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)},
                        mutable=['intermediates'])
  _, eval_state = deep.apply(variables, x, mutable=['intermediates'])
  sown, eval_sown = state['intermediates'], eval_state['intermediates']
  np.testing.assert_array_equal(sown['block1'][0], sown['block0'][0])
  np.testing.assert_array_equal(sown['block0'][0], eval_sown['block0'][0])
  assert not np.allclose(eval_sown['block1'][0], eval_sown['block0'][0])


def test_train_mode_runs_on_plain_vit():
  module, size, variables = _init('vit_test_patch8_32', drop_path_rate=0.5)
  x = _images(size, batch=4)
  a = module.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)})
  assert a.shape == (4, 5) and np.isfinite(a).all()
  assert not np.allclose(a, module.apply(variables, x))


def test_bfloat16_compute():
  name = 'deit_test_distilled_patch8_32'
  module, size, variables = _init(name)
  x = _images(size)
  ref = module.apply(variables, x)
  half, _ = create_model(name, num_classes=5, dtype=jnp.bfloat16)
  logits, state = half.apply(variables, x, mutable=['intermediates'])
  assert logits.dtype == jnp.float32
  assert state['intermediates']['block0'][0].dtype == jnp.bfloat16
  assert np.isfinite(logits).all()
  np.testing.assert_allclose(logits, ref, atol=0.1 * np.abs(ref).max() + 1e-2)
  init_half = complexity.abstract_variables(half, size)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init_half))


def test_wrong_input_size_is_a_clear_error():
  module, size, variables = _init('vit_test_patch8_32')
  with pytest.raises(ValueError, match=r'expects images \(B, 32, 32, 3\), got \(1, 48, 48, 3\)'):
    module.apply(variables, jnp.zeros((1, 48, 48, 3)))
