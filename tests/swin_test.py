"""Swin Transformer: timm parity (Swin-T at 224, window 12 at 384, padded windows),
sown intermediates, the shifted-window mask, stochastic depth, bf16, parameter/MAC counts.

The tiny test preset's parity with timm and Hugging Face is in swin_convert_test.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from helpers.timm_reference_batch import shared_timm_references

from kdflax.convert.timm import load_timm_checkpoint
from kdflax.models import MODELS, complexity, create_model, swin
from kdflax.models.swin import SwinBlock, num_stage_windows

TOL = 1e-4
TEST_PRESET = 'swin_test_patch4_window4_64'
# Two stages (grids 16 and 8, window 4): block 1 of stage 1 is shifted by 2.
SMALL = dict(depths=(1, 2), num_heads=(1, 2))
HOOKS = [f'layers.{i}' for i in range(4)]
# Swin-B at 384 made shallow and narrow: stages 0-2 (grids 96, 48, 24) shift by 6, stage 3
# (grid 12 = window) does not.
W12_ARCH = dict(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8))
# Window 3 on grids 16, 8, 4 is padded at the bottom/right after the shift (as timm does);
# the last stage's grid 2 clips the window.
PADDED_ARCH = dict(depths=(2, 2, 2, 1), window_size=3)
SWIN_PRESETS = sorted(name for name, spec in MODELS.items() if spec.family == 'swin')


@pytest.fixture(scope='module')
def timm_refs(tmp_path_factory):
  """One PyTorch process: three references and the timm parameter count of every preset
  (timm names only the window-7/224 sizes, so each is built from its full arch kwargs)."""
  specs = {
      'swin_t': dict(model='swin_tiny_patch4_window7_224', num_classes=10, image_size=224,
                     batch=1, hooks=HOOKS),
      'w12_384': dict(model='swin_base_patch4_window12_384', num_classes=10, image_size=384,
                      batch=1, hooks=HOOKS, kwargs=W12_ARCH),
      'padded': dict(model='swin_tiny_patch4_window7_224', num_classes=5, image_size=64,
                     batch=1, hooks=HOOKS, kwargs={**MODELS[TEST_PRESET].kwargs, **PADDED_ARCH}),
  }
  counts = {name: ('swin_tiny_patch4_window7_224', dict(MODELS[name].kwargs))
            for name in SWIN_PRESETS}
  return shared_timm_references(tmp_path_factory, specs, param_counts=counts)


def _jit(fn, *args):
  """`jax.jit(fn)` compiled for `args` at LLVM opt level 0: half the compile time on CPU."""
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})


def _random_variables(module, image_size, seed=0):
  """NumPy variables of `module`'s shapes (no init compile): LayerNorm scales near 1,
  relative-position tables of std 1 so that attention is far from uniform."""
  abstract = traverse_util.flatten_dict(complexity.abstract_variables(module, image_size))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in abstract.items():
    if path[-1] == 'scale':
      value = 1 + 0.1 * rng.standard_normal(leaf.shape)
    elif path[-1] == 'relative_position_bias_table':
      value = rng.standard_normal(leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _apply_with_intermediates(module, variables, image):
  fn = lambda v, x: module.apply(v, x, mutable=['intermediates'])  # noqa: E731
  logits, state = _jit(fn, variables, image)(variables, image)
  return np.asarray(logits), {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}


def _check_parity(module, variables, ref):
  logits, inter = _apply_with_intermediates(module, variables, ref.image)
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, ref.logits, atol=TOL, rtol=0)
  for i in range(len(module.depths)):
    np.testing.assert_allclose(inter[f'stage{i}'], ref.hooks[f'layers.{i}'], atol=TOL, rtol=0,
                               err_msg=f'stage{i}')
  return logits, inter


def test_swin_tiny_224_matches_timm(timm_refs):
  name = 'swin_tiny_patch4_window7_224'
  ref = timm_refs[0]['swin_t']
  variables = load_timm_checkpoint(name, ref.checkpoint)
  module, size = create_model(name, num_classes=10)
  assert size == 224 and ref.num_params == 27_527_044
  assert complexity.count_params(variables) == ref.num_params
  _check_parity(module, variables, ref)


def test_swin_384_window12_matches_timm(timm_refs):
  name = 'swin_base_patch4_window12_384'
  ref = timm_refs[0]['w12_384']
  variables = load_timm_checkpoint(name, ref.pth_checkpoint, **W12_ARCH)
  module, size = create_model(name, num_classes=10, **W12_ARCH)
  assert size == 384
  assert module.attention_layout() == (
      (96, 96, 12, 6), (48, 48, 12, 6), (24, 24, 12, 6), (12, 12, 12, 0))
  _check_parity(module, variables, ref)


def test_windows_that_do_not_divide_the_grid_match_timm(timm_refs):
  ref = timm_refs[0]['padded']
  variables = load_timm_checkpoint(TEST_PRESET, ref.checkpoint, **PADDED_ARCH)
  module, _ = create_model(TEST_PRESET, num_classes=5, **PADDED_ARCH)
  layout = module.attention_layout()
  assert layout == ((16, 16, 3, 1), (8, 8, 3, 1), (4, 4, 3, 1), (2, 2, 2, 0))
  _, inter = _check_parity(module, variables, ref)
  # Attention covers the padded grid: 6 x 6, 3 x 3, 2 x 2 windows of 3 x 3, then one of 2 x 2.
  assert [num_stage_windows(stage) for stage in layout] == [36, 9, 4, 1]
  for i, stage in enumerate(layout):
    assert inter[f'stage{i}_attn'].shape == (num_stage_windows(stage), 2 ** i, stage[2] ** 2,
                                             stage[2] ** 2)


def test_attention_layout_of_presets():
  # Unbound modules; the last block of a stage of even depth is shifted unless the window
  # covers the grid (Swin-T's stage 3: 7 x 7 tokens, window 7).
  tiny, _ = create_model('swin_tiny_patch4_window7_224', num_classes=3)
  assert tiny.attention_layout() == ((56, 56, 7, 3), (28, 28, 7, 3), (14, 14, 7, 3), (7, 7, 7, 0))
  test, _ = create_model(TEST_PRESET, num_classes=3)
  assert test.attention_layout() == ((16, 16, 4, 0), (8, 8, 4, 2), (4, 4, 4, 0), (2, 2, 2, 0))
  odd, _ = create_model(TEST_PRESET, num_classes=3, depths=(2, 3, 1, 2))
  assert odd.attention_layout() == ((16, 16, 4, 2), (8, 8, 4, 0), (4, 4, 4, 0), (2, 2, 2, 0))


def test_intermediates_keys_shapes_and_layout():
  module, size = create_model(TEST_PRESET, num_classes=7)
  abstract = complexity.abstract_variables(module, size)
  assert set(abstract) == {'params'}  # no masks or indices stored as variables
  variables = _random_variables(module, size)
  image = np.random.default_rng(1).uniform(size=(2, size, size, 3)).astype(np.float32)

  def both(v, x):  # one compile for both calls
    return module.apply(v, x), module.apply(v, x, mutable=['intermediates'])

  plain, (logits, state) = _jit(both, variables, image)(variables, image)
  assert set(state) == {'intermediates'}
  inter = {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}
  expected = {}
  for i, ((h, w, win, _), dim, heads) in enumerate(
      zip(module.attention_layout(), (32, 64, 128, 256), module.num_heads, strict=True)):
    expected[f'stage{i}'] = (2, h, w, dim)
    expected[f'stage{i}_attn'] = (2 * (h // win) * (w // win), heads, win * win, win * win)
    assert num_stage_windows((h, w, win, 0)) == (h // win) * (w // win)
  assert {k: v.shape for k, v in inter.items()} == expected
  # Without the collection mutable, the same logits and nothing else.
  assert isinstance(plain, jax.Array) and plain.shape == (2, 7) and plain.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
  # Attention weights are softmax rows.
  for i in range(4):
    np.testing.assert_allclose(inter[f'stage{i}_attn'].sum(-1), 1.0, atol=1e-5)


def _allowed_pairs(grid, window, shift):
  """`(nW, N, N)` bool, derived independently of the model: after rolling the grid by
  `-shift`, two tokens of a window may attend to each other iff neither or both of their
  original rows (and columns) wrapped around the edge."""
  original = np.roll(np.arange(grid), -shift)  # original row/column of each rolled position
  wrapped = original < shift                    # came around from the top/left edge
  rows = np.broadcast_to(wrapped[:, None], (grid, grid))
  cols = np.broadcast_to(wrapped[None, :], (grid, grid))

  def windows(a):
    n = grid // window
    return a.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, window ** 2)

  r, c = windows(rows), windows(cols)
  return (r[:, :, None] == r[:, None, :]) & (c[:, :, None] == c[:, None, :])


def test_shifted_window_attention_is_zero_across_regions():
  module, size = create_model(TEST_PRESET, num_classes=4, **SMALL)
  assert module.attention_layout() == ((16, 16, 4, 0), (8, 8, 4, 2))
  variables = _random_variables(module, size, seed=3)
  image = np.random.default_rng(4).uniform(size=(2, size, size, 3)).astype(np.float32)
  _, inter = _apply_with_intermediates(module, variables, image)

  attn = inter['stage1_attn'].reshape(2, 4, 2, 16, 16)          # (B, nW, heads, N, N)
  allowed = _allowed_pairs(8, 4, 2)[None, :, None]
  assert (~allowed).sum() > 0 and allowed[0, 0, 0].all()        # the first window is whole
  assert np.all(np.where(allowed, 0.0, attn) < 1e-30)           # masked: exactly ~0
  assert np.all(np.where(allowed, attn, 1.0) > 1e-6)            # unmasked: all attended
  np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
  # The unshifted stage has no mask at all.
  assert inter['stage0_attn'].min() > 1e-6


def test_stochastic_depth_and_dropout():
  base, size = create_model(TEST_PRESET, num_classes=4, **SMALL)
  dropped, _ = create_model(TEST_PRESET, num_classes=4, drop_path_rate=0.5, drop_rate=0.2,
                            **SMALL)
  assert dropped._drop_path_rates() == [(0.0,), (0.25, 0.5)]  # timm's linear schedule
  variables = _random_variables(base, size, seed=5)
  image = np.random.default_rng(6).uniform(size=(2, size, size, 3)).astype(np.float32)

  def run(v, x, key_a, key_b):  # one compile for all five calls
    return (base.apply(v, x), dropped.apply(v, x),
            dropped.apply(v, x, train=True, rngs={'dropout': key_a}),
            dropped.apply(v, x, train=True, rngs={'dropout': key_b}),
            base.apply(v, x, train=True, rngs={'dropout': key_a}))

  keys = jax.random.key(0), jax.random.key(1)
  outs = _jit(run, variables, image, *keys)(variables, image, *keys)
  eval_base, eval_dropped, train_a, train_b, train_base = map(np.asarray, outs)
  np.testing.assert_array_equal(eval_dropped, eval_base)    # identity in eval
  assert np.abs(train_a - eval_base).max() > 1e-3           # active in train
  assert np.abs(train_a - train_b).max() > 1e-3             # drawn from the 'dropout' rng
  np.testing.assert_allclose(train_base, eval_base, atol=1e-6)  # no rates: train == eval
  with pytest.raises(Exception, match='dropout'):          # train needs the rng
    jax.eval_shape(lambda v, x: dropped.apply(v, x, train=True), variables, image)


def test_drop_path_drops_whole_residual_branches_per_sample():
  # 16 copies of one input through a block whose two residual branches each drop with rate
  # 0.5: per-sample drop path leaves at most 4 distinct outputs (each branch kept or not),
  # where element-wise dropout would make all 16 differ.
  block = SwinBlock(dim=8, num_heads=2, window=4, shift=2, drop_path_rate=0.5)
  x = np.broadcast_to(np.random.default_rng(9).standard_normal((1, 8, 8, 8)), (16, 8, 8, 8))
  x = np.ascontiguousarray(x, dtype=np.float32)
  abstract = jax.eval_shape(block.init, jax.random.key(0), x)
  rng = np.random.default_rng(10)
  variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)
  def both(v, xx):
    return (block.apply(v, xx, train=True, rngs={'dropout': jax.random.key(2)})[0],
            block.apply(v, xx)[0])

  out, eval_out = (np.asarray(o).reshape(16, -1) for o in _jit(both, variables, x)(variables, x))
  distinct = np.unique(np.round(out, 4), axis=0)
  assert 2 <= len(distinct) <= 4
  # A sample whose two branches were both dropped is its input, unchanged (while in eval
  # the block does change it).
  flat_x = x.reshape(16, -1)
  assert np.any(np.abs(out - flat_x).max(axis=1) < 1e-6)
  assert np.abs(eval_out - flat_x).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params_and_logits():
  module, size = create_model(TEST_PRESET, num_classes=4, **SMALL)
  half, _ = create_model(TEST_PRESET, num_classes=4, dtype=jnp.bfloat16, **SMALL)
  abstract = complexity.abstract_variables(half, size)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {np.dtype(np.float32)}
  variables = _random_variables(module, size, seed=7)
  image = np.random.default_rng(8).uniform(size=(2, size, size, 3)).astype(np.float32)

  def both(v, x):
    return module.apply(v, x), half.apply(v, x, mutable=['intermediates'])

  full, (logits, state) = _jit(both, variables, image)(variables, image)
  full, logits = np.asarray(full), np.asarray(logits)
  assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
  assert state['intermediates']['stage1'][0].dtype == jnp.bfloat16
  assert np.abs(logits - full).max() < 0.05 * np.abs(full).max() + 0.02
  assert np.abs(logits - full).max() > 0  # bf16 really was used


def test_layer_norm_is_exact_on_large_activations():
  # Late stages of trained Swins carry activations of mean in the hundreds; the one-pass
  # variance E[x^2] - E[x]^2 would be off by ~1e-2 there in float32.
  x = (500 + np.random.default_rng(11).standard_normal((4, 768))).astype(np.float32)
  norm = swin._layer_norm('norm', jnp.float32, jnp.float32)
  out = np.asarray(norm.apply({'params': {'scale': np.ones(768, np.float32),
                                          'bias': np.zeros(768, np.float32)}}, x))
  x64 = x.astype(np.float64)
  expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, expected, atol=1e-4)


def test_wrong_image_size_is_a_clear_error():
  module, _ = create_model(TEST_PRESET, num_classes=4)
  with pytest.raises(ValueError, match=r'expects images of shape \(B, 64, 64, 3\)'):
    jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 96, 96, 3),
                                                                        jnp.float32))


# Published ImageNet-1k figures (Liu et al. 2021; timm): GMACs.
PUBLISHED_GMACS = {
    ('swin_tiny_patch4_window7_224', 224): 4.49,
    ('swin_small_patch4_window7_224', 224): 8.74,
    ('swin_base_patch4_window7_224', 224): 15.43,
    ('swin_large_patch4_window7_224', 224): 34.48,
    ('swin_large_patch4_window12_384', 384): 103.9,
}


def test_param_counts_match_timm_and_macs_match_published(timm_refs):
  theirs = timm_refs[1]
  for name in SWIN_PRESETS:
    module, size = create_model(name, num_classes=1000)
    variables = complexity.abstract_variables(module, size)
    ours = complexity.count_params(variables)
    assert abs(ours - theirs[name]) <= 1e-3 * theirs[name], (name, ours, theirs[name])
    if (name, size) in PUBLISHED_GMACS:
      gmacs = complexity.count_macs(module, variables, size) / 1e9
      published = PUBLISHED_GMACS[name, size]
      assert abs(gmacs - published) <= 0.02 * published, (name, gmacs, published)
