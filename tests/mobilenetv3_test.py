"""MobileNetV3: structure against timm, complexity, intermediates contract, train/eval modes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.timm_mnv3_facts import timm_mnv3_facts

from kdflax.convert.timm import convert_state_dict
from kdflax.models import complexity, create_model
from kdflax.models import mobilenetv3 as mnv3
from kdflax.models.depthwise import reference_form
from kdflax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

PRESETS = [f'mobilenetv3_{v}_{w}' for v in ('large', 'small') for w in ('100', '075', '050')]


@pytest.fixture(scope='module')
def timm_facts():
  return timm_mnv3_facts(PRESETS, num_classes=1000)


def _sown_shapes(module, variables, image_size):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, xx: module.apply(v, xx, mutable=['intermediates']), variables, x)
  return {k: v[0].shape for k, v in state['intermediates'].items()}


@pytest.mark.parametrize('name', PRESETS)
def test_structure_matches_timm(timm_facts, name):
  facts = timm_facts[name]
  # Every timm tensor maps onto one of our variables of the same size, and none is left over
  # on either side (convert_state_dict raises otherwise), so the parameter counts agree.
  state_dict = {k: np.zeros(shape, np.float32) for k, shape in facts['state_dict'].items()}
  variables = convert_state_dict(name, state_dict)
  module, size = create_model(name, num_classes=1000)
  assert complexity.count_params(variables) == facts['num_params']
  assert facts['bn'] == [[mnv3.BN_EPS, pytest.approx(1 - mnv3.BN_MOMENTUM)]]
  assert facts['mean'] == pytest.approx(IMAGENET_MEAN)
  assert facts['std'] == pytest.approx(IMAGENET_STD)
  # Stride 4/8/16/32 features: the same timm blocks, the same widths as what we sow.
  timm_features = [f for f in facts['feature_info'] if f['reduction'] >= 4]
  assert [f['reduction'] for f in timm_features] == [4, 8, 16, 32]
  assert [f['module'] for f in timm_features] == [
      f'blocks.{i}' for i in mnv3.FEATURE_STAGES[module.variant]]
  assert _sown_shapes(module, variables, size) == {
      f'stage{i}': (1, size // f['reduction'], size // f['reduction'], f['num_chs'])
      for i, f in enumerate(timm_features)}


@pytest.mark.parametrize('name, published', [('mobilenetv3_large_100', 0.217e9),
                                             ('mobilenetv3_small_100', 0.057e9)])
def test_macs_match_published(name, published):
  module, size = create_model(name, num_classes=1000)
  macs = complexity.count_macs(module, complexity.abstract_variables(module, size), size)
  assert abs(macs - published) <= 0.02 * published, macs


def test_make_divisible_is_timms_rounding():
  # nearest multiple of 8, at least 8, never more than 10% below the value
  assert [mnv3.make_divisible(v) for v in (4, 12, 18, 20, 72 * 0.25, 240 * 0.25, 36)] == [
      8, 16, 24, 24, 24, 64, 40]
  assert mnv3.stem_features(0.5) == 16 and mnv3.stem_features(0.75) == 16


def test_bad_options_are_clear_errors():
  with pytest.raises(ValueError, match="variant must be 'large' or 'small', got 'medium'"):
    create_model('mobilenetv3_large_100', num_classes=3, variant='medium')
  with pytest.raises(ValueError, match='width_mult must be positive, got 0'):
    create_model('mobilenetv3_small_100', num_classes=3, width_mult=0)


def random_variables(module, image_size: int, seed: int = 0):
  """Random variables of `module`'s shapes, drawn in NumPy.

  `module.init` would do, but compiling ~150 threefry initialisers costs 15+ CPU seconds.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return rng.normal(0, np.sqrt(1 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name == 'scale':
      return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(draw, complexity.abstract_variables(module, image_size))


@pytest.fixture(scope='module')
def tiny():
  """Small-0.5 at 64 px: a cheap real network for contract checks."""
  module, _ = create_model('mobilenetv3_small_050', num_classes=5, drop_rate=0.0)
  x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  return module, random_variables(module, 64), x


def _jit(fn):
  # LLVM optimisation level 0 halves the CPU compile time of the bfloat16 graph; same HLO.
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0})


@pytest.fixture(scope='module')
def tiny_eval(tiny):
  """One compiled eval pass: plain logits, (logits, intermediates), bfloat16 logits."""
  module, variables, x = tiny
  return _jit(lambda v, xx: (
      module.apply(v, xx), module.apply(v, xx, mutable=['intermediates']),
      module.clone(dtype=jnp.bfloat16).apply(v, xx)))(variables, x)


def _train_fn(module):
  """Jitted `(variables, x, key) -> (logits, mutated state)` in train mode, sowing stages."""
  return _jit(lambda v, x, key: module.apply(
      v, x, train=True, mutable=['batch_stats', 'intermediates'], rngs={'dropout': key}))


def _eval_jaxpr(module, variables, x):
  return str(jax.make_jaxpr(lambda v, xx: module.apply(v, xx))(variables, x))


def test_intermediates_contract(tiny_eval):
  plain, (logits, state), _ = tiny_eval
  assert plain.shape == (2, 5) and plain.dtype == jnp.float32
  np.testing.assert_array_equal(logits, plain)
  assert set(state) == {'intermediates'}
  sown = state['intermediates']
  assert all(isinstance(v, tuple) and len(v) == 1 for v in sown.values())
  assert {k: tuple(v[0].shape) for k, v in sown.items()} == {
      'stage0': (2, 16, 16, 8), 'stage1': (2, 8, 8, 16), 'stage2': (2, 4, 4, 24),
      'stage3': (2, 2, 2, 288)}


def test_bfloat16_runs_close_to_float32(tiny_eval):
  ref, _, out = tiny_eval
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max() + 1e-3
  assert np.abs(out - ref).max() > 0  # it did compute in bfloat16


def test_dropout_only_in_train_and_batch_stats_update(tiny):
  module, variables, x = tiny
  noisy = module.clone(drop_rate=0.5)
  # Eval: the very same graph as without dropout (and no rng needed).
  assert _eval_jaxpr(noisy, variables, x) == _eval_jaxpr(module, variables, x)
  train = _train_fn(noisy)
  logits, state = train(variables, x, jax.random.key(1))
  assert set(state) == {'batch_stats', 'intermediates'}
  np.testing.assert_array_equal(train(variables, x, jax.random.key(1))[0], logits)
  other, other_state = train(variables, x, jax.random.key(2))
  assert np.abs(other - logits).max() > 1e-3                 # head dropout draws from the rng
  np.testing.assert_array_equal(other_state['intermediates']['stage3'][0],
                                state['intermediates']['stage3'][0])  # ... and only there

  old, new = variables['batch_stats'], state['batch_stats']
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), old, new)
  assert all(jax.tree.leaves(changed))
  # The stem BN sees conv_stem(normalised x): its running stats move 10% towards the batch's
  # (Flax momentum 0.9 = PyTorch momentum 0.1).
  xn = (x - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)
  stem = jax.lax.conv_general_dilated(
      xn, variables['params']['conv_stem']['kernel'], (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(new['bn1']['mean'], 0.9 * old['bn1']['mean'] +
                             0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['bn1']['var'], 0.9 * old['bn1']['var'] +
                             0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_drop_path_drops_residual_branches_only_in_train(tiny):
  module, variables, x = tiny
  noisy = module.clone(drop_path_rate=0.5)
  assert _eval_jaxpr(noisy, variables, x) == _eval_jaxpr(module, variables, x)
  train = _train_fn(noisy)
  (a, sa), (b, sb) = (train(variables, x, jax.random.key(seed)) for seed in (1, 2))
  assert np.abs(a - b).max() > 1e-3
  stages = [(sa['intermediates'][f'stage{i}'][0], sb['intermediates'][f'stage{i}'][0])
            for i in range(4)]
  # Small's stage 0 is one stride-2 block without a residual: nothing to drop there.
  np.testing.assert_array_equal(*stages[0])
  assert np.abs(stages[3][0] - stages[3][1]).max() > 1e-3  # 10 residual blocks later


def _all_eqns(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out.extend(_all_eqns(sub))
  return out


def test_export_clean_no_dense_on_rank4():
  """Every matmul in the eval graph is 2-D: jax2tf -> TFLite needs no batch_matmul."""
  module, size = create_model('mobilenetv3_large_100', num_classes=10)
  module = reference_form(module)  # the form export traces: depthwise as grouped convolutions
  variables = complexity.abstract_variables(module, size)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, xx: module.apply(v, xx))(variables, x).jaxpr
  eqns = _all_eqns(jaxpr)
  dots = [e for e in eqns if e.primitive.name == 'dot_general']
  convs = [e for e in eqns if e.primitive.name == 'conv_general_dilated']
  assert len(dots) == 1 and all(v.aval.ndim == 2 for v in dots[0].invars)
  # stem + head, then ds: 2, 14 x ir: 3, 8 SE: 2, cn: 1
  assert len(convs) == 2 + 2 + 14 * 3 + 8 * 2 + 1
