"""Each model family declares the layout of what it sows (`kdflax.models.layout`)."""

import pytest

from kdflax.distill import attention
from kdflax.models import create_model
from kdflax.models.init import init_variables
from kdflax.models.layout import ModelLayout, layout_of
from kdflax.train.stages import intermediates_shapes


def _sown(module, size):
  variables = init_variables(module, 0, size)
  return {k: v[0].shape for k, v in intermediates_shapes(module, variables, size).items()}


def test_swin_declares_every_sown_window_attention_with_a_layout_that_fits_it():
  module, size = create_model('swin_test_patch4_window4_64', 3)
  layout, sown = layout_of(module), _sown(module, size)
  attn_keys = sorted(k for k in sown if k.endswith('_attn'))
  assert sorted(layout.window_attention) == attn_keys == [f'stage{i}_attn' for i in range(4)]
  for key, value in layout.window_attention.items():
    assert attention.window_attention_shape_error(sown[key], value) is None
  assert layout.num_prefix_tokens == 0


@pytest.mark.parametrize('name, prefix', [('vit_test_patch8_32', 1)])
def test_vit_declares_its_prefix_tokens_and_grid(name, prefix):
  module, size = create_model(name, 3)
  layout, sown = layout_of(module), _sown(module, size)
  grid = size // module.patch_size
  assert layout == ModelLayout(num_prefix_tokens=prefix, token_grid=(grid, grid))
  assert sown['block0'][1] == prefix + grid * grid
  deit = module.clone(distilled=True)
  assert layout_of(deit).num_prefix_tokens == 2


def test_a_cnn_has_the_empty_layout():
  module, _ = create_model('mobilenetv3_small_050', 3)
  assert layout_of(module) == ModelLayout()


def test_layout_dicts_are_checked():
  assert ModelLayout.create({'num_prefix_tokens': 1}, 'teacher').num_prefix_tokens == 1
  with pytest.raises(ValueError, match="teacher_layout: unknown key"):
    ModelLayout.create({'prefix': 1}, 'teacher')
