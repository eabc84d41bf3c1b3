"""Writes `data/beans_small`: every iBean train/val photo, short side 128 px, for `make demo`.

    python tools/make_beans_small.py [--src ../shared/data/beans] [--out data/beans_small]

The demo trains and validates on the whole iBean train (1,034) and val (133) splits so that one
validation photo is 0.75 points, not 2.2. Each photo is decoded, resized so its short side is
128 px (PIL bicubic; the demo's models run at 64 and 128 px) and re-encoded as JPEG quality 90;
file names and class folders are kept, and `MANIFEST.sha256` lists every file written.
Deterministic: the same source gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os

from PIL import Image

SPLITS = ('train', 'val')


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
  """`image` as RGB, scaled (bicubic) so that min(width, height) == side."""
  image = image.convert('RGB')
  scale = side / min(image.size)
  return image.resize((round(image.width * scale), round(image.height * scale)),
                      Image.BICUBIC)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--src', default=os.path.join('..', 'shared', 'data', 'beans'))
  parser.add_argument('--out', default=os.path.join('data', 'beans_small'))
  parser.add_argument('--side', type=int, default=128)
  args = parser.parse_args()
  manifest = []
  for split in SPLITS:
    for cls in sorted(os.listdir(os.path.join(args.src, split))):
      folder = os.path.join(args.src, split, cls)
      os.makedirs(os.path.join(args.out, split, cls), exist_ok=True)
      for name in sorted(os.listdir(folder)):
        rel = os.path.join(split, cls, name)
        with Image.open(os.path.join(folder, name)) as image:
          small = resize_short_side(image, args.side)
        out = os.path.join(args.out, rel)
        small.save(out, format='JPEG', quality=90)
        with open(out, 'rb') as f:
          manifest.append(f'{hashlib.sha256(f.read()).hexdigest()}  ./{rel}')
  with open(os.path.join(args.out, 'MANIFEST.sha256'), 'w') as f:
    f.write('\n'.join(manifest) + '\n')
  print(f'{len(manifest)} photos -> {args.out}')


if __name__ == '__main__':
  main()
