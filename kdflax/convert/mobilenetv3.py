"""timm MobileNetV3 state dict -> `kdflax.models.mobilenetv3.MobileNetV3` variables.

The Flax module keeps timm's layer names, so the map is mechanical:

    conv_stem.weight (O,I,k,k)             -> params/conv_stem/kernel (k,k,I,O)
    blocks.2.1.conv_dw.weight (C,1,k,k)    -> params/blocks_2_1/conv_dw/kernel (k,k,1,C)
    blocks.2.1.se.conv_reduce.bias         -> params/blocks_2_1/se/conv_reduce/bias
    blocks.2.1.bn2.{weight,bias}           -> params/blocks_2_1/bn2/{scale,bias}
    blocks.2.1.bn2.running_{mean,var}      -> batch_stats/blocks_2_1/bn2/{mean,var}
    conv_head.{weight,bias}                -> params/conv_head/{kernel (1,1,C,F), bias}
    classifier.weight (K,F)                -> params/classifier/kernel (F,K)

Shape and completeness checks live in `kdflax.convert.timm`, which lists every problem at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import numpy as np

_LAYER = re.compile(
    r'^(?P<module>conv_stem|bn1|conv_head|classifier|'
    r'blocks\.\d+\.\d+\.(?:conv|conv_pw|conv_dw|conv_pwl|bn1|bn2|bn3|se\.conv_reduce|se\.conv_expand))'
    r'\.(?P<leaf>weight|bias|running_mean|running_var)$')


def num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """Classifier size of a timm MobileNetV3 state dict; None for any other state dict.

  MobileNetV3 is recognised by `conv_stem`, `blocks.*`, a biased `conv_head` and a
  `classifier`, without EfficientNet's head BatchNorm `bn2`.
  """
  needed = ('conv_stem.weight', 'conv_head.weight', 'conv_head.bias', 'classifier.weight')
  if not all(k in state_dict for k in needed) or 'bn2.weight' in state_dict:
    return None
  if not any(k.startswith('blocks.') for k in state_dict):
    return None
  shape = np.shape(state_dict['classifier.weight'])
  return int(shape[0]) if len(shape) == 2 else None


def _flax_path(module: str) -> str:
  parts = module.split('.')
  if parts[0] == 'blocks':
    parts = [f'blocks_{parts[1]}_{parts[2]}', *parts[3:]]
  return '/'.join(parts)


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       module: nn.Module) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps timm keys to flat Flax paths ('params/...', 'batch_stats/...').

  Args:
    state_dict: `{timm_key: array}`.
    module: the target `MobileNetV3` (its names follow timm, so only the keys are needed).

  Returns:
    `(flat_variables, unused_keys)`: converted arrays by '/'-joined path, and the state-dict
    keys that are no MobileNetV3 parameter (e.g. `num_batches_tracked`). Tensors of an
    unexpected rank are passed through untransposed so the caller reports their shape.
  """
  del module  # the key layout alone determines the mapping
  return map_layers(state_dict, _LAYER)


def map_layers(state_dict: Mapping[str, np.ndarray],
               layer: re.Pattern) -> tuple[dict[str, np.ndarray], list[str]]:
  """timm conv / BN / Linear tensors -> flat Flax paths, for keys that `layer` matches.

  `layer` has groups `module` (a dotted timm module path; `blocks.i.j.` becomes
  `blocks_i_j/`) and `leaf` (weight, bias, running_mean, running_var). Modules whose last
  name starts with 'bn' are BatchNorms. Returns `(flat_variables, unused_keys)` as
  `convert_state_dict` does; the timm-style CNN families (MobileNetV3, EfficientNet-Lite)
  share it.
  """
  out: dict[str, np.ndarray] = {}
  unused: list[str] = []
  for key, value in state_dict.items():
    match = layer.match(key)
    if match is None:
      unused.append(key)
      continue
    path = _flax_path(match['module'])
    leaf = match['leaf']
    is_bn = path.rsplit('/', 1)[-1].startswith('bn')
    value = np.asarray(value)
    if is_bn:
      name = {'weight': 'params/{}/scale', 'bias': 'params/{}/bias',
              'running_mean': 'batch_stats/{}/mean', 'running_var': 'batch_stats/{}/var'}[leaf]
      out[name.format(path)] = value
    elif leaf == 'bias':
      out[f'params/{path}/bias'] = value
    elif leaf == 'weight':
      if value.ndim == 4:    # conv OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C)
        value = value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:  # Linear (out, in) -> (in, out)
        value = value.T
      out[f'params/{path}/kernel'] = value
    else:  # running stats of a non-BN layer
      unused.append(key)
  return out, unused
