"""timm MobileNetV3 checkpoints -> kdflax: eval parity of logits and stage features, bad files."""

import jax
import numpy as np
import pytest
from helpers.timm_reference_batch import shared_timm_references

from kdflax.convert import mobilenetv3 as convert_mnv3
from kdflax.convert.timm import (
  CheckpointError,
  convert_state_dict,
  load_state_dict,
  load_timm_checkpoint,
)
from kdflax.models import create_model
from kdflax.models.mobilenetv3 import FEATURE_STAGES

TOLERANCE = 1e-4
# name -> image size of the reference run (224 for the phone student, smaller for the rest).
CASES = {'mobilenetv3_large_100': 224, 'mobilenetv3_small_100': 160,
         'mobilenetv3_large_075': 96, 'mobilenetv3_small_050': 96}


def _hooks(name):
  variant = 'small' if '_small_' in name else 'large'
  return [f'blocks.{i}' for i in FEATURE_STAGES[variant]]


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  """Random timm models (BatchNorm stats from a calibration batch), run in one subprocess."""
  specs = {name: dict(model=name, num_classes=10, image_size=size, hooks=_hooks(name),
                      calibrate_bn=True) for name, size in CASES.items()}
  return shared_timm_references(tmp_path_factory, specs)[0]


@pytest.mark.parametrize('name', list(CASES))
def test_eval_parity_with_timm(references, name):
  ref = references[name]
  variables = load_timm_checkpoint(name, ref.checkpoint)  # classes inferred from the checkpoint
  module, _ = create_model(name, num_classes=10)
  logits, state = jax.jit(lambda v, x: module.apply(v, x, mutable=['intermediates']))(
      variables, ref.image)
  assert logits.shape == ref.logits.shape == (2, 10)
  assert np.abs(ref.logits).max() > 0.1  # a live network, not a near-constant output
  np.testing.assert_allclose(logits, ref.logits, rtol=0, atol=TOLERANCE)
  for i, hook in enumerate(_hooks(name)):
    ours = state['intermediates'][f'stage{i}'][0]
    theirs = ref.hooks[hook].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert ours.shape == theirs.shape, (hook, ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE, err_msg=hook)


def test_pth_loads_the_same_variables(references):
  ref = references['mobilenetv3_large_100']
  from_safetensors = load_timm_checkpoint('mobilenetv3_large_100', ref.checkpoint)
  from_pth = load_timm_checkpoint('mobilenetv3_large_100', ref.pth_checkpoint, num_classes=10)
  assert jax.tree.structure(from_pth) == jax.tree.structure(from_safetensors)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_safetensors)


def test_key_and_layout_mapping(references):
  state_dict = load_state_dict(references['mobilenetv3_large_100'].checkpoint)
  flat, unused = convert_mnv3.convert_state_dict(state_dict, None)
  assert unused and all(k.endswith('num_batches_tracked') for k in unused)
  w = state_dict['blocks.3.0.conv_dw.weight']  # depthwise (C, 1, k, k)
  assert w.shape == (240, 1, 3, 3)
  np.testing.assert_array_equal(flat['params/blocks_3_0/conv_dw/kernel'][1, 2, 0, 7], w[7, 0, 1, 2])
  w = state_dict['blocks.3.0.conv_pw.weight']  # (O, I, 1, 1) -> (1, 1, I, O)
  np.testing.assert_array_equal(flat['params/blocks_3_0/conv_pw/kernel'][0, 0, 5, 9], w[9, 5, 0, 0])
  np.testing.assert_array_equal(flat['params/classifier/kernel'], state_dict['classifier.weight'].T)
  np.testing.assert_array_equal(flat['batch_stats/blocks_2_1/bn3/var'],
                                state_dict['blocks.2.1.bn3.running_var'])
  np.testing.assert_array_equal(flat['params/blocks_2_1/se/conv_reduce/bias'],
                                state_dict['blocks.2.1.se.conv_reduce.bias'])


def test_num_classes_recognises_only_mobilenetv3(references):
  state_dict = load_state_dict(references['mobilenetv3_small_100'].checkpoint)
  assert convert_mnv3.num_classes(state_dict) == 10
  efficientnet_like = {**state_dict, 'bn2.weight': np.ones(1024, np.float32)}
  assert convert_mnv3.num_classes(efficientnet_like) is None
  swin_like = {'patch_embed.proj.weight': np.zeros((96, 3, 4, 4)),
               'head.fc.weight': np.zeros((10, 768))}
  assert convert_mnv3.num_classes(swin_like) is None
  with pytest.raises(CheckpointError, match='no mobilenetv3 classifier weights found'):
    convert_state_dict('mobilenetv3_small_100', swin_like, source='swin.pth')


def test_small_checkpoint_as_large_lists_every_problem(references):
  with pytest.raises(CheckpointError) as info:
    load_timm_checkpoint('mobilenetv3_large_100', references['mobilenetv3_small_100'].checkpoint)
  message = str(info.value)
  assert 'model.safetensors does not fit mobilenetv3_large_100 (10 classes): ' in message
  # Large has blocks Small lacks, Small has SE where Large has none, widths differ.
  assert 'missing (88): batch_stats/blocks_3_2/bn1/mean' in message
  assert 'unexpected (32): (flax) batch_stats/blocks_4_2/bn1/mean' in message
  assert 'wrong shape (141): batch_stats/blocks_1_0/bn1/mean (72,) != expected (64,)' in message


def test_missing_wrong_shape_and_unknown_keys_are_reported_together(references):
  state_dict = load_state_dict(references['mobilenetv3_large_100'].checkpoint)
  del state_dict['blocks.3.1.conv_dw.weight']
  state_dict['blocks.2.0.se.conv_reduce.weight'] = np.zeros((8, 72, 1, 1), np.float32)
  state_dict['blocks.9.0.conv_pw.weight'] = np.zeros((8, 8, 1, 1), np.float32)
  state_dict['head.extra'] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as info:
    convert_state_dict('mobilenetv3_large_100', state_dict, source='broken.safetensors')
  message = str(info.value)
  assert message.startswith('broken.safetensors does not fit mobilenetv3_large_100')
  assert 'missing (1): params/blocks_3_1/conv_dw/kernel' in message
  assert ('wrong shape (1): params/blocks_2_0/se/conv_reduce/kernel (1, 1, 72, 8) '
          '!= expected (1, 1, 72, 24)') in message
  assert 'unexpected (2): head.extra, (flax) params/blocks_9_0/conv_pw/kernel' in message
