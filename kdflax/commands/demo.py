"""`kdflax demo` (what `make demo` runs): the model table, then the whole pipeline.

    kdflax demo [--workdir runs/demo] [--config configs/quickstart.py] [--config.key=value ...]

1. A table of the presets that matter here (params, GMACs, resolution, CPU ms/image on bundled
   leaf photos for the small ones, the maps each model sows for distillation).
2. `kdflax pipeline` on the bundled bean-leaf sample: teacher, baseline student, distilled
   student, export to `.tflite`, results table.
"""

from __future__ import annotations

import argparse
import glob
import os

from kdflax.commands import info, pipeline

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
TIMED = ('swin_test_patch4_window4_64', 'mobilenetv3_small_050', 'mobilenetv3_large_100')
LISTED = ('swin_tiny_patch4_window7_224', 'swin_large_patch4_window12_384',
          'deit_tiny_patch16_224', 'mobilenetv3_small_100')


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax demo', description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default=os.path.join('runs', 'demo'))
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'quickstart.py'))
  args, rest = parser.parse_known_args(argv[1:])
  photos = sorted(glob.glob(os.path.join(info.SAMPLE_DIR, '*', '*.jpg')))[::15][:3]
  print('== kdflax models (1000 classes; CPU ms/image measured on bundled leaf photos)')
  rows = [info.describe(name, 1000, True, photos) for name in TIMED]
  rows += [info.describe(name, 1000, False, photos) for name in LISTED]
  print(info.format_table(rows), flush=True)
  print(f'\n== pipeline: {os.path.relpath(args.config, ROOT)} -> {args.workdir}', flush=True)
  return pipeline.main(['pipeline', '--config', args.config, '--workdir', args.workdir, *rest])
