"""Swin checkpoint conversion: timm (current and old key layouts) and Hugging Face
transformers state dicts -> Flax variables, parity of the converted models with their PyTorch
sources, and the errors a checkpoint that does not fit produces."""

import re

import jax
import numpy as np
import pytest
from helpers.timm_reference_batch import shared_timm_references

from kdflax.convert import swin as swin_convert
from kdflax.convert.timm import (
  CheckpointError,
  convert_state_dict,
  load_state_dict,
  load_timm_checkpoint,
)
from kdflax.models import MODELS, create_model
from kdflax.models.swin import relative_position_index, shifted_window_mask

TOL = 1e-4
PRESET = 'swin_test_patch4_window4_64'
# HF Swin sizes its relative-position table by the configured window even where a stage's
# grid clips the window, and then fails; window 2 is never clipped on grids 16, 8, 4, 2.
HF_WINDOW = 2


@pytest.fixture(scope='module')
def refs(tmp_path_factory):
  """The test preset as a random timm model, and an HF `SwinForImageClassification`."""
  arch = dict(MODELS[PRESET].kwargs)
  hf_arch = dict(embed_dim=arch['embed_dim'], depths=list(arch['depths']),
                 num_heads=list(arch['num_heads']), window_size=HF_WINDOW)
  specs = {
      'timm': dict(model='swin_tiny_patch4_window7_224', num_classes=10, image_size=64,
                   hooks=[f'layers.{i}' for i in range(4)], kwargs=arch),
      'hf': dict(model='hf_swin', num_classes=10, image_size=64, hf_swin=True, kwargs=hf_arch),
  }
  return shared_timm_references(tmp_path_factory, specs)[0]


@pytest.fixture(scope='module')
def timm_state(refs):
  return load_state_dict(refs['timm'].checkpoint)


@pytest.fixture(scope='module')
def hf_state(refs):
  return load_state_dict(refs['hf'].checkpoint)


def _apply(module, variables, image):
  fn = lambda v, x: module.apply(v, x, mutable=['intermediates'])  # noqa: E731
  compiled = jax.jit(fn).lower(variables, image).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  logits, state = compiled(variables, image)
  return np.asarray(logits), {k: np.asarray(v[0]) for k, v in state['intermediates'].items()}


def _assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_test_preset_matches_timm_from_safetensors_and_pth(refs):
  ref = refs['timm']
  variables = load_timm_checkpoint(PRESET, ref.checkpoint)
  _assert_same_variables(variables, load_timm_checkpoint(PRESET, ref.pth_checkpoint))
  module, _ = create_model(PRESET, num_classes=10)
  assert module.attention_layout()[3] == (2, 2, 2, 0)  # grid 2 < window 4: clipped, no shift
  logits, inter = _apply(module, variables, ref.image)
  np.testing.assert_allclose(logits, ref.logits, atol=TOL, rtol=0)
  for i in range(4):
    np.testing.assert_allclose(inter[f'stage{i}'], ref.hooks[f'layers.{i}'], atol=TOL, rtol=0,
                               err_msg=f'stage{i}')


def test_hf_swin_matches_hf_logits(refs, hf_state):
  ref = refs['hf']
  assert any(k.endswith('attention.q_proj.weight') for k in hf_state)
  assert swin_convert.num_classes(hf_state) == 10
  variables = load_timm_checkpoint(PRESET, ref.checkpoint, window_size=HF_WINDOW)
  module, _ = create_model(PRESET, num_classes=10, window_size=HF_WINDOW)
  logits, _ = _apply(module, variables, ref.image)
  np.testing.assert_allclose(logits, ref.logits, atol=TOL, rtol=0)


# transformers >= 5 names -> the names of Hub checkpoints (transformers' own conversion map).
HUB_NAMES = (
    ('attention.q_proj.', 'attention.self.query.'),
    ('attention.k_proj.', 'attention.self.key.'),
    ('attention.v_proj.', 'attention.self.value.'),
    ('attention.relative_position_bias.relative_position_bias_table',
     'attention.self.relative_position_bias_table'),
    ('attention.o_proj.', 'attention.output.dense.'),
    ('mlp.fc1.', 'intermediate.dense.'),
    ('mlp.fc2.', 'output.dense.'),
)


def test_hf_hub_key_names_convert_to_the_same_variables(hf_state):
  hub = {}
  for key, value in hf_state.items():
    for new, old in HUB_NAMES:
      key = key.replace(new, old)
    hub[key] = value
    if key.endswith('attention.self.relative_position_bias_table'):  # persistent on the Hub
      hub[key.replace('_bias_table', '_index')] = relative_position_index(HF_WINDOW)
  assert any('attention.self.query' in k for k in hub) and not any('q_proj' in k for k in hub)
  expected = convert_state_dict(PRESET, hf_state, window_size=HF_WINDOW)
  _assert_same_variables(convert_state_dict(PRESET, hub, window_size=HF_WINDOW), expected)


def _old_layout(state):
  """Current timm keys -> the original Microsoft / timm < 0.9 layout: PatchMerging at the END
  of the previous stage, `head.weight`, persistent index and mask buffers."""
  old = {}
  for key, value in state.items():
    key = re.sub(r'^layers\.(\d+)\.downsample\.',
                 lambda m: f'layers.{int(m[1]) - 1}.downsample.', key)
    key = key.replace('head.fc.', 'head.')
    old[key] = value
  module, _ = create_model(PRESET, num_classes=10)
  for i, (grid, _, window, _) in enumerate(module.attention_layout()):
    for j in range(module.depths[i]):
      prefix = f'layers.{i}.blocks.{j}.'
      old[prefix + 'attn.relative_position_index'] = relative_position_index(window)
      if j % 2 and grid > window:
        old[prefix + 'attn_mask'] = shifted_window_mask(grid, grid, window, window // 2)
  return old


def test_old_timm_layout_converts_to_the_same_variables(timm_state):
  old = _old_layout(timm_state)
  assert 'layers.0.downsample.reduction.weight' in old and 'head.weight' in old
  assert 'layers.1.blocks.1.attn_mask' in old
  _assert_same_variables(convert_state_dict(PRESET, old), convert_state_dict(PRESET, timm_state))


def test_num_classes_recognises_only_swin_classifiers(timm_state, hf_state):
  assert swin_convert.num_classes(timm_state) == 10
  assert swin_convert.num_classes(_old_layout(timm_state)) == 10
  assert swin_convert.num_classes(hf_state) == 10
  headless = {k: v for k, v in timm_state.items() if not k.startswith('head.')}
  assert swin_convert.num_classes(headless) is None
  vit = {'blocks.0.attn.qkv.weight': np.zeros((6, 2)), 'head.weight': np.zeros((10, 2))}
  beit = {'blocks.0.attn.relative_position_bias_table': np.zeros((9, 1)),
          'head.weight': np.zeros((10, 2))}
  mobilenet = {'conv_stem.weight': np.zeros((4, 3, 3, 3)), 'classifier.weight': np.zeros((7, 4))}
  for other in (vit, beit, mobilenet):
    assert swin_convert.num_classes(other) is None


def test_missing_keys_are_listed(timm_state):
  broken = {k: v for k, v in timm_state.items()
            if k not in ('layers.1.blocks.1.attn.qkv.weight', 'norm.bias')}
  with pytest.raises(CheckpointError) as err:
    convert_state_dict(PRESET, broken, source='broken.safetensors')
  message = str(err.value)
  assert message.startswith('broken.safetensors does not fit swin_test_patch4_window4_64')
  assert 'missing (2): params/layers_1/blocks_1/attn/qkv/kernel, params/norm/bias' in message
  assert 'unexpected' not in message and 'wrong shape' not in message


def test_wrong_shapes_are_listed(timm_state):
  # The checkpoint has embed_dim 32: a 48-wide model finds every tensor mis-shaped.
  with pytest.raises(CheckpointError) as err:
    convert_state_dict(PRESET, timm_state, embed_dim=48)
  message = str(err.value)
  assert 'wrong shape (' in message and 'missing' not in message
  assert 'params/head/kernel (256, 10) != expected (384, 10)' in message
  assert 'params/layers_0/blocks_0/norm1/scale (32,) != expected (48,)' in message
  # Asking for another number of classes than the checkpoint's head has.
  with pytest.raises(CheckpointError, match=r'params/head/kernel \(256, 10\) != expected '
                                            r'\(256, 5\)'):
    convert_state_dict(PRESET, timm_state, num_classes=5)


def test_unexpected_keys_are_listed_but_buffers_ignored(timm_state):
  extra = dict(timm_state)
  extra['layers.0.blocks.0.attn.extra.weight'] = np.zeros((3, 3), np.float32)
  extra['absolute_pos_embed'] = np.zeros((1, 256, 32), np.float32)
  extra['layers.0.blocks.0.attn.relative_position_index'] = relative_position_index(4)
  with pytest.raises(CheckpointError) as err:
    convert_state_dict(PRESET, extra)
  message = str(err.value)
  assert ('unexpected (2): absolute_pos_embed, layers.0.blocks.0.attn.extra.weight'
          in message), message
  assert 'relative_position_index' not in message and 'missing' not in message


def test_incomplete_hf_attention_is_reported(hf_state):
  broken = {k: v for k, v in hf_state.items()
            if k != 'swin.encoder.layers.1.blocks.0.attention.k_proj.weight'}
  with pytest.raises(CheckpointError) as err:
    convert_state_dict(PRESET, broken, window_size=HF_WINDOW)
  message = str(err.value)
  assert 'missing (1): params/layers_1/blocks_0/attn/qkv/kernel' in message
  assert ('unexpected (2): swin.encoder.layers.1.blocks.0.attention.q_proj.weight, '
          'swin.encoder.layers.1.blocks.0.attention.v_proj.weight') in message
