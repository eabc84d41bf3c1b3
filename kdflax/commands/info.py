"""`kdflax info`: params, GMACs, resolution and sown intermediates of registered models.

    kdflax info                                   # every preset, computed abstractly (seconds)
    kdflax info mobilenetv3_large_100 --forward   # also CPU ms/image on bundled leaf photos

Counts are at 1000 classes unless `--num_classes` says otherwise; nothing is materialised
without `--forward` (Swin-L costs no memory here).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdflax.models import complexity, registry
from kdflax.models.init import init_variables

SAMPLE_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'data', 'beans_sample', 'val')


def load_photos(paths: list[str], size: int) -> np.ndarray:
  """Decodes images, resizes the short side to `size / 0.875`, centre-crops `size`.

  Returns:
    `(len(paths), size, size, 3)` float32 in [0, 1].
  """
  from PIL import Image
  out = []
  for path in paths:
    with Image.open(path) as im:
      im = im.convert('RGB')
      scale = size / 0.875 / min(im.size)
      im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                     Image.BICUBIC)
      left, top = (im.width - size) // 2, (im.height - size) // 2
      out.append(np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0)
  return np.stack(out)


def _sown_shapes(module, variables, image_size: int) -> dict[str, tuple[int, ...]]:
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  _, state = jax.eval_shape(
      lambda v, xx: module.apply(v, xx, mutable=['intermediates']), variables, x)
  return {k: tuple(v[0].shape) for k, v in state['intermediates'].items()}


def _natural(key: str) -> tuple:
  return tuple(int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key))


def _format_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
  keys = sorted((k for k in shapes if not k.endswith('_attn')), key=_natural)
  text = ' '.join(f'{k}{list(shapes[k][1:])}' for k in keys[:6])
  if len(keys) > 6:
    text += f' ... ({len(keys)} maps)'
  attn = [k for k in shapes if k.endswith('_attn')]
  if attn:
    text += f' + {len(attn)} window-attention maps'
  return text


def describe(name: str, num_classes: int, forward: bool, photos: list[str]) -> dict:
  """One table row for model `name` (see module docstring)."""
  module, size = registry.create_model(name, num_classes)
  abstract = complexity.abstract_variables(module, size)
  row = {'model': name, 'params': complexity.count_params(abstract),
         'gmacs': complexity.count_macs(module, abstract, size) / 1e9, 'resolution': size,
         'sown': _sown_shapes(module, abstract, size), 'ms_per_image': None, 'top1': None}
  if forward:
    variables = init_variables(module, 0, size)
    images = jnp.asarray(load_photos(photos, size))
    apply = jax.jit(module.apply)
    jax.block_until_ready(apply(variables, images))       # compile
    start = time.perf_counter()
    logits = jax.block_until_ready(apply(variables, images))
    row['ms_per_image'] = (time.perf_counter() - start) * 1000 / len(photos)
    assert np.all(np.isfinite(np.asarray(logits))), f'{name}: non-finite logits'
  return row


def format_table(rows: list[dict]) -> str:
  header = f'{"model":<40} {"params":>12} {"GMACs":>8} {"res":>4} {"CPU ms/img":>10}  sown maps'
  lines = [header, '-' * len(header)]
  for r in rows:
    ms = f'{r["ms_per_image"]:.1f}' if r['ms_per_image'] is not None else '-'
    lines.append(f'{r["model"]:<40} {r["params"]:>12,} {r["gmacs"]:>8.3f} {r["resolution"]:>4} '
                 f'{ms:>10}  {_format_shapes(r["sown"])}')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax info', description=__doc__.splitlines()[0])
  parser.add_argument('models', nargs='*', help='registered names (default: all presets)')
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--forward', action='store_true',
                      help='initialise each model and time a forward pass on bundled photos')
  parser.add_argument('--photos', type=int, default=3, help='photos per forward pass')
  args = parser.parse_args(argv[1:])
  names = args.models or sorted(registry.MODELS)
  try:
    for name in names:
      registry.model_spec(name)
  except ValueError as e:
    print(f'kdflax info: {e}', file=sys.stderr)
    return 2
  photos = sorted(glob.glob(os.path.join(SAMPLE_DIR, '*', '*.jpg')))[::15][:args.photos]
  if args.forward and not photos:
    parser.error(f'no bundled photos found under {os.path.abspath(SAMPLE_DIR)}')
  rows = []
  for name in names:
    rows.append(describe(name, args.num_classes, args.forward, photos))
    print(format_table(rows[-1:]).splitlines()[-1] if rows[:-1] else format_table(rows),
          flush=True)
  return 0
