"""timm ViT / DeiT state dict -> flat Flax variables of `kdflax.models.vit.VisionTransformer`.

    timm key                                 Flax path (under 'params/')
    cls_token, dist_token, pos_embed          same name, same shape (1, T, C)
    patch_embed.proj.weight (C, 3, p, p)      patch_embed/kernel (p, p, 3, C)
    blocks.{i}.norm{1,2}.weight / .bias       blocks_{i}/norm{1,2}/scale / bias
    blocks.{i}.attn.{qkv,proj}.weight (o, i)  blocks_{i}/attn/{qkv,proj}/kernel (i, o)
    blocks.{i}.mlp.{fc1,fc2}.weight (o, i)    blocks_{i}/mlp/{fc1,fc2}/kernel (i, o)
    norm.weight / .bias                       norm/scale / bias
    head{,_dist}.weight (K, C) / .bias        head{,_dist}/kernel (C, K) / bias

Keys that do not belong to the target module (other families' keys, blocks beyond `depth`,
the distillation token and head when the module is not distilled) are returned as unused, so
`kdflax.convert.timm` reports them by their PyTorch name. Shapes are not checked here: a
checkpoint for another size or resolution (e.g. a `pos_embed` for a different token grid) is
reported as a wrong-shape error by the caller. Nothing is resampled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import numpy as np

_REQUIRED = ('cls_token', 'pos_embed', 'patch_embed.proj.weight')
_BLOCK = re.compile(r'blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)'
                    r'\.(weight|bias)')
_TOP = re.compile(r'(norm|head|head_dist)\.(weight|bias)')


def num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """Head size of a timm ViT/DeiT state dict; None when it is not one (or has no head)."""
  if not all(k in state_dict for k in _REQUIRED) or 'head.weight' not in state_dict:
    return None
  if not any(k.startswith('blocks.') for k in state_dict):
    return None
  head = np.shape(state_dict['head.weight'])
  return int(head[0]) if len(head) == 2 else None


def _linear_or_norm(path: str, kind: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One torch Linear or LayerNorm tensor -> (flax path, array); LayerNorms end in `norm*`."""
  value = np.asarray(value)
  if kind == 'bias':
    return f'{path}/bias', value
  if path.rsplit('/', 1)[-1].startswith('norm'):
    return f'{path}/scale', value
  # Linear weight (out, in) -> kernel (in, out); other ranks go through for the shape check.
  return f'{path}/kernel', value.T if value.ndim == 2 else value


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       module: nn.Module) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps a timm ViT/DeiT state dict onto `module` (a `VisionTransformer`).

  Args:
    state_dict: `{torch_key: array}`.
    module: the unbound target module; its `depth` and `distilled` decide which keys are used.

  Returns:
    `(flat_variables, unused_keys)`: `{'params/...': array}` with Flax layouts, and the
    torch keys that were not mapped.
  """
  out: dict[str, np.ndarray] = {}
  unused: list[str] = []
  distill_keys = ('dist_token', 'head_dist.weight', 'head_dist.bias')
  for key, value in state_dict.items():
    if key in distill_keys and not module.distilled:
      unused.append(key)
    elif key in ('cls_token', 'dist_token', 'pos_embed'):
      out[f'params/{key}'] = np.asarray(value)
    elif key == 'patch_embed.proj.weight':
      value = np.asarray(value)
      # OIHW -> HWIO; anything that is not rank 4 is left as is for the shape check to report.
      out['params/patch_embed/kernel'] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    elif key == 'patch_embed.proj.bias':
      out['params/patch_embed/bias'] = np.asarray(value)
    elif (m := _BLOCK.fullmatch(key)) and int(m.group(1)) < module.depth:
      path = f'params/blocks_{m.group(1)}/{m.group(2).replace(".", "/")}'
      k, v = _linear_or_norm(path, m.group(3), value)
      out[k] = v
    elif m := _TOP.fullmatch(key):
      k, v = _linear_or_norm(f'params/{m.group(1)}', m.group(2), value)
      out[k] = v
    else:
      unused.append(key)
  return out, unused
