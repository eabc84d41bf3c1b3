"""`kdflax cache-teacher`: run the frozen teacher once over K fixed augmented views per image.

    kdflax cache-teacher --config configs/beans_hybrid.py --teacher_workdir runs/beans/teacher \
        --out runs/beans/teacher_cache --views 8
    kdflax distill --config configs/beans_hybrid.py --workdir runs/beans/cached \
        --config.teacher.cache=runs/beans/teacher_cache

The cache holds the teacher's logits and the targets of the configured attention/manifold
pairs for each (image, view); `distill` with `--config.teacher.cache=DIR` then trains without
running the teacher, each example showing one of its K views (docs/teacher_cache.md). The
teacher may also be given as `--config.teacher.checkpoint=MODEL_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import ml_collections

from kdflax.commands.common import parse_with_overrides, run_with_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Known flags + the `--config.*` overrides (anything else is a usage error)."""
  parser = argparse.ArgumentParser(prog=f'kdflax {argv[0]}',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='the distill config file')
  parser.add_argument('--teacher_workdir', default=None,
                      help='workdir of a `kdflax teacher` run (its model_best/) or a model '
                           'directory (default: config.teacher.checkpoint)')
  parser.add_argument('--out', required=True, help='cache directory to write')
  parser.add_argument('--views', type=int, default=4, help='augmented views per image (K)')
  parser.add_argument('--batch_size', type=int, default=0,
                      help='images per teacher forward (default: config.data.batch_size)')
  parser.add_argument('--shard_images', type=int, default=0,
                      help='images per .npy shard (default: about 256 MB per shard)')
  return parse_with_overrides(parser, argv[1:])


def main(argv: list[str]) -> int:
  return run_with_config(argv, parse_args, _build)


def _build(command: str, args: argparse.Namespace,
           config: ml_collections.ConfigDict) -> int:
  """Builds the cache at `args.out`; prints its summary as JSON."""
  from kdflax.train import interrupt
  from kdflax.train.checkpoint import resolve_model_dir
  from kdflax.train.teacher_cache.build import build_cache
  from kdflax.train.teacher_cache.format import PARTIAL
  try:  # SIGINT / SIGTERM: one line and exit 130 / 143 (`run_reporting_errors`)
    with interrupt.handle_signals(command, ''):
      manifest = build_cache(config, args.out,
                             teacher_dir=resolve_model_dir(args.teacher_workdir),
                             views=args.views, batch_size=args.batch_size,
                             shard_images=args.shard_images)
  except KeyboardInterrupt as e:
    out = os.path.abspath(os.path.expanduser(args.out))
    shutil.rmtree(f'{out}{PARTIAL}{os.getpid()}', ignore_errors=True)
    e.detail = (f'{out} was not written (a build is all or nothing; its partial folder is '
                'removed); build it again with the same command')
    raise
  print(json.dumps({'out': args.out, 'images': manifest['num_images'],
                    'views': manifest['views'], 'arrays': manifest['arrays'],
                    'build_seconds': manifest['build_seconds']}, indent=2))
  return 0
