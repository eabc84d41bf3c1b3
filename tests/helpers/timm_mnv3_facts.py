"""Static facts about timm's MobileNetV3 presets, gathered in a subprocess (no weights allocated).

Why a subprocess: timm imports torchvision, which segfaults after TensorFlow (see
`timm_reference.py`). Models are built on PyTorch's `meta` device, so nothing is materialised.

    facts = timm_mnv3_facts(['mobilenetv3_large_100', ...], num_classes=1000)
    facts['mobilenetv3_large_100'] == {
        'num_params': int, 'bn': [[eps, momentum], ...] (distinct over every BatchNorm),
        'mean': [3 floats], 'std': [3 floats], 'drop_rate': float,
        'feature_info': [{'module': 'blocks.1', 'reduction': 4, 'num_chs': 24}, ...],
        'state_dict': {torch_key: [shape...]}}

timm registers no `mobilenetv3_large_050`; that name is built with timm's own generator
(`_gen_mobilenet_v3`) at channel multiplier 0.5, exactly as its registered presets are.
"""

from __future__ import annotations

import json
import sys


def timm_mnv3_facts(models: list[str], num_classes: int = 1000) -> dict[str, dict]:
  """Facts (see module docstring) for each MobileNetV3 name in `models`."""
  from helpers.torch_child import run_torch_child
  out = run_torch_child(__file__, [str(num_classes), *models], 'timm facts', timeout=600)
  return json.loads(out.strip().splitlines()[-1])


def _create(name: str, num_classes: int):
  import timm
  from timm.models import mobilenetv3
  if name in timm.list_models('mobilenetv3_*'):
    return timm.create_model(name, pretrained=False, num_classes=num_classes)
  variant, width = name.rsplit('_', 1)  # e.g. mobilenetv3_large_050
  return mobilenetv3._gen_mobilenet_v3(f'{variant}_100', int(width) / 100,
                                       num_classes=num_classes)


def _main() -> None:
  import torch
  num_classes, names = int(sys.argv[1]), sys.argv[2:]
  out = {}
  for name in names:
    with torch.device('meta'):
      model = _create(name, num_classes)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    out[name] = {
        'num_params': sum(p.numel() for p in model.parameters()),
        'bn': sorted({(m.eps, m.momentum) for m in norms}),
        'mean': list(model.pretrained_cfg['mean']),
        'std': list(model.pretrained_cfg['std']),
        'drop_rate': model.drop_rate,
        'feature_info': [{k: f[k] for k in ('module', 'reduction', 'num_chs')}
                         for f in model.feature_info],
        'state_dict': {k: list(v.shape) for k, v in model.state_dict().items()},
    }
  print(json.dumps(out))


if __name__ == '__main__':
  _main()
