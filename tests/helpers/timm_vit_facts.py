"""Static facts about timm's ViT/DeiT presets, gathered in a subprocess (no weights allocated).

Why a subprocess: timm imports torchvision, which segfaults after TensorFlow (see
`timm_reference.py`). Models are built on PyTorch's `meta` device, so even ViT-B costs nothing.

    facts = timm_vit_facts(['deit_tiny_patch16_224', ...], num_classes=1000)
    facts['deit_tiny_patch16_224'] == {
        'num_params': int, 'ln_eps': [float, ...] (distinct eps of every LayerNorm),
        'mean': [3 floats], 'std': [3 floats], 'num_prefix_tokens': int, 'grid_size': [h, w],
        'state_dict': {torch_key: [shape...]}}
"""

from __future__ import annotations

import json
import sys


def timm_vit_facts(models: list[str], num_classes: int = 1000) -> dict[str, dict]:
  """Facts (see module docstring) for each timm model name in `models`."""
  from helpers.torch_child import run_torch_child
  out = run_torch_child(__file__, [str(num_classes), *models], 'timm facts', timeout=600)
  return json.loads(out.strip().splitlines()[-1])


def _main() -> None:
  import timm
  import torch
  num_classes, names = int(sys.argv[1]), sys.argv[2:]
  out = {}
  for name in names:
    with torch.device('meta'):
      model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    out[name] = {
        'num_params': sum(p.numel() for p in model.parameters()),
        'ln_eps': sorted({m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}),
        'mean': list(model.pretrained_cfg['mean']),
        'std': list(model.pretrained_cfg['std']),
        'num_prefix_tokens': model.num_prefix_tokens,
        'grid_size': list(model.patch_embed.grid_size),
        'state_dict': {k: list(v.shape) for k, v in model.state_dict().items()},
    }
  print(json.dumps(out))


if __name__ == '__main__':
  _main()
