"""kdflax.convert.vit: timm ViT/DeiT checkpoints -> Flax, numerical parity and error paths.

Parity: a randomly initialised timm model (biases perturbed) is saved, converted with
`load_timm_checkpoint`, and our eval-mode logits and every block output must match timm's
within 1e-4. Key coverage and error paths use timm's real key/shape lists (from the `meta`
device, see `helpers/timm_vit_facts.py`) filled with zeros.
"""

import jax
import numpy as np
import pytest
from helpers.timm_reference_batch import timm_references
from helpers.timm_vit_facts import timm_vit_facts

from kdflax.convert import vit as convert_vit
from kdflax.convert.timm import CheckpointError, convert_state_dict, load_timm_checkpoint
from kdflax.models import MODELS, complexity, create_model, vit

PRESETS = sorted(n for n, s in MODELS.items() if s.family == 'vit' and '_test_' not in n)
ATOL = 1e-4
VIT_OVERRIDES = dict(depth=2, img_size=64)


@pytest.fixture(scope='module')
def facts():
  return timm_vit_facts(PRESETS, num_classes=1000)


@pytest.fixture(scope='module')
def refs(tmp_path_factory):
  """The three timm parity references, made in one PyTorch process."""
  refs, _ = timm_references(tmp_path_factory.mktemp('vit_refs'), {
      'deit': dict(model='deit_tiny_patch16_224', num_classes=10, image_size=224,
                   hooks=[f'blocks.{i}' for i in range(12)]),
      'distilled': dict(model='deit_tiny_distilled_patch16_224', num_classes=10,
                        image_size=224, hooks=['head', 'head_dist', 'blocks.0', 'blocks.11']),
      # A shallow, small-image vit_tiny: cheap, with the preset's own mean/std.
      'vit': dict(model='vit_tiny_patch16_224', num_classes=7, image_size=64,
                  hooks=['blocks.1'], kwargs=VIT_OVERRIDES),
  })
  return refs


def _zeros(shapes: dict) -> dict[str, np.ndarray]:
  """A state dict with timm's keys and shapes, every tensor a zero-stride float32 zero."""
  return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


def _run(name: str, variables, image: np.ndarray, **overrides):
  module, _ = create_model(name, num_classes=variables['params']['head']['bias'].shape[0],
                           **overrides)
  fn = jax.jit(lambda v, x: module.apply(v, x, mutable=['intermediates']))
  logits, state = fn(variables, image)
  return module, np.asarray(logits), jax.tree.map(lambda t: np.asarray(t[0]),
                                                   state['intermediates'],
                                                   is_leaf=lambda t: isinstance(t, tuple))


def test_deit_tiny_matches_timm_logits_and_every_block(refs):
  name, ref = 'deit_tiny_patch16_224', refs['deit']
  variables = load_timm_checkpoint(name, ref.checkpoint)
  module, logits, sown = _run(name, variables, ref.image)
  assert logits.shape == (2, 10)
  np.testing.assert_allclose(logits, ref.logits, atol=ATOL, rtol=0)
  assert set(sown) == {f'block{i}' for i in range(12)}
  for i in range(12):
    assert sown[f'block{i}'].shape == ref.hooks[f'blocks.{i}'].shape == (2, 197, 192)
    np.testing.assert_allclose(sown[f'block{i}'], ref.hooks[f'blocks.{i}'], atol=ATOL, rtol=0,
                               err_msg=f'block{i}')
  assert module.num_prefix_tokens == 1 and module.grid_size == 14


def test_deit_tiny_distilled_pth_matches_timm_logits_and_both_heads(refs):
  name, ref = 'deit_tiny_distilled_patch16_224', refs['distilled']
  variables = load_timm_checkpoint(name, ref.pth_checkpoint)          # .pth via torch.load
  _, logits, sown = _run(name, variables, ref.image)
  np.testing.assert_allclose(logits, ref.logits, atol=ATOL, rtol=0)
  np.testing.assert_allclose(sown['cls_logits'], ref.hooks['head'], atol=ATOL, rtol=0)
  np.testing.assert_allclose(sown['dist_logits'], ref.hooks['head_dist'], atol=ATOL, rtol=0)
  # The heads differ, so the mean is not a coincidence of one head.
  assert np.abs(ref.hooks['head'] - ref.hooks['head_dist']).max() > 100 * ATOL
  for i in (0, 11):
    assert sown[f'block{i}'].shape == (2, 198, 192)
    np.testing.assert_allclose(sown[f'block{i}'], ref.hooks[f'blocks.{i}'], atol=ATOL, rtol=0)


def test_vit_preset_uses_its_own_mean_std(refs):
  # timm's vit_* weights expect mean = std = 0.5, unlike DeiT's ImageNet statistics.
  name, ref, overrides = 'vit_tiny_patch16_224', refs['vit'], VIT_OVERRIDES
  variables = load_timm_checkpoint(name, ref.checkpoint, **overrides)
  _, logits, sown = _run(name, variables, ref.image, **overrides)
  np.testing.assert_allclose(logits, ref.logits, atol=ATOL, rtol=0)
  np.testing.assert_allclose(sown['block1'], ref.hooks['blocks.1'], atol=ATOL, rtol=0)
  # With DeiT's ImageNet normalisation the same weights give clearly different logits.
  _, deit_logits, _ = _run('deit_tiny_patch16_224', variables, ref.image, **overrides)
  assert np.abs(deit_logits - ref.logits).max() > 100 * ATOL


def test_presets_match_timm_params_eps_and_normalisation(facts):
  assert len(PRESETS) == 10
  for name in PRESETS:
    module, size = create_model(name, num_classes=1000)
    ours = complexity.count_params(complexity.abstract_variables(module, size))
    ref = facts[name]
    assert ours == ref['num_params'], (name, ours, ref['num_params'])
    assert ref['ln_eps'] == [vit.LN_EPS], (name, ref['ln_eps'])
    np.testing.assert_allclose(module.mean, ref['mean'], err_msg=name)
    np.testing.assert_allclose(module.std, ref['std'], err_msg=name)
    assert module.num_prefix_tokens == ref['num_prefix_tokens'], name
    assert [module.grid_size] * 2 == ref['grid_size'], name
  # The original vit_* weights expect [-1, 1] inputs, DeiT ImageNet-normalised ones.
  assert create_model('vit_small_patch16_224', 10)[0].mean == (0.5, 0.5, 0.5)
  assert create_model('deit_small_patch16_224', 10)[0].mean == vit.IMAGENET_MEAN


def test_every_preset_converts_from_timm_keys(facts):
  for name in PRESETS:
    variables = convert_state_dict(name, _zeros(facts[name]['state_dict']), source=name)
    assert variables['params']['head']['kernel'].shape[1] == 1000, name
    assert set(variables) == {'params'}


def test_num_classes_recognises_only_vit_state_dicts(facts):
  state = _zeros(facts['deit_small_distilled_patch16_224']['state_dict'])
  assert convert_vit.num_classes(state) == 1000
  headless = {k: v for k, v in state.items() if not k.startswith('head')}
  assert convert_vit.num_classes(headless) is None
  swin_like = {'patch_embed.proj.weight': np.zeros((96, 3, 4, 4)),
               'layers.0.blocks.0.attn.qkv.weight': np.zeros((288, 96)),
               'head.fc.weight': np.zeros((10, 768))}
  assert convert_vit.num_classes(swin_like) is None
  with pytest.raises(CheckpointError, match='no vit classifier weights'):
    convert_state_dict('deit_tiny_patch16_224', swin_like, source='swin.pth')


def test_missing_and_unknown_keys_are_listed(facts):
  state = _zeros(facts['deit_tiny_patch16_224']['state_dict'])
  del state['blocks.3.mlp.fc1.weight'], state['norm.bias']
  state['blocks.0.ls1.gamma'] = np.zeros(192, np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_state_dict('deit_tiny_patch16_224', state, source='tiny.safetensors')
  msg = str(e.value)
  assert msg.startswith('tiny.safetensors does not fit deit_tiny_patch16_224 (1000 classes)')
  assert 'missing (2): params/blocks_3/mlp/fc1/kernel, params/norm/bias' in msg
  assert 'unexpected (1): blocks.0.ls1.gamma' in msg


def test_deit_small_into_deit_tiny_lists_wrong_shapes(facts):
  state = _zeros(facts['deit_small_patch16_224']['state_dict'])
  with pytest.raises(CheckpointError) as e:
    convert_state_dict('deit_tiny_patch16_224', state, source='small.pth')
  msg = str(e.value)
  assert 'missing' not in msg and 'unexpected' not in msg
  assert 'wrong shape (151)' in msg     # all but head.bias, which is (1000,) in both
  assert 'params/blocks_0/attn/qkv/kernel (384, 1152) != expected (192, 576)' in msg


def test_distilled_and_plain_checkpoints_do_not_cross(facts):
  distilled = _zeros(facts['deit_tiny_distilled_patch16_224']['state_dict'])
  with pytest.raises(CheckpointError) as e:
    convert_state_dict('deit_tiny_patch16_224', distilled, source='distilled.pth')
  msg = str(e.value)
  assert 'unexpected (3): dist_token, head_dist.bias, head_dist.weight' in msg
  assert 'params/pos_embed (1, 198, 192) != expected (1, 197, 192)' in msg

  plain = _zeros(facts['deit_tiny_patch16_224']['state_dict'])
  with pytest.raises(CheckpointError) as e:
    convert_state_dict('deit_tiny_distilled_patch16_224', plain, source='plain.pth')
  msg = str(e.value)
  assert ('missing (3): params/dist_token, params/head_dist/bias, params/head_dist/kernel'
          in msg)
  assert 'params/pos_embed (1, 197, 192) != expected (1, 198, 192)' in msg


def test_position_grid_mismatch_is_not_resampled(facts):
  state = _zeros(facts['deit_tiny_patch16_224']['state_dict'])
  with pytest.raises(CheckpointError, match=r'params/pos_embed \(1, 197, 192\) != expected '
                                            r'\(1, 577, 192\)'):
    convert_state_dict('deit_tiny_patch16_224', state, source='224.pth', img_size=384)
  # Deeper checkpoint into a shallower model: the surplus blocks are reported, not dropped.
  with pytest.raises(CheckpointError, match=r'unexpected \(\d+\): blocks\.10\.'):
    convert_state_dict('deit_tiny_patch16_224', state, source='deep.pth', depth=10)
