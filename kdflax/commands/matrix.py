"""`kdflax matrix`: every distillation method x seed on one config, exported, with mean +- std.

    kdflax matrix --config configs/beans_hybrid.py --workdir runs/beans_matrix \
        [--methods baseline,kd,hybrid] [--seeds 0,1,2] [--config.key=value ...]

1. The teacher: `config.teacher.checkpoint` when set, else trained once in `WORKDIR/teacher`
   (its val top-1 goes into the results as `teacher_val_top1`).
2. For every method and seed: the same student, data, augmentation, optimizer and schedule,
   with only the loss terms of the method switched on (`METHODS`; each term keeps the weight
   and options the config gives it, a term the config leaves at weight 0 gets weight 1.0,
   except cross-entropy beside `kd` / `dkd`: at 0 it stays off there, and the student learns
   from the teacher alone),
   `config.seed` (init, dropout, data order, augmentation) set to the seed; in
   `WORKDIR/<method>_s<seed>`.
   `baseline` is the plain student stage (cross-entropy, no teacher).
3. Each row's best model is exported to int8 `.tflite` (calibrated on the train split) and
   both the JAX model and the `.tflite` are scored on the eval split.
4. `WORKDIR/results.json` (`rows`: method, seed, val_top1, int8_val_top1, tflite, wall_s; and
   `summary`: per method mean and std) and `WORKDIR/results.md` (a table with mean +- std).

With `--cache_views K` the teacher runs once per seed over K augmented views of every train
image (`WORKDIR/cache_s<seed>`, `kdflax cache-teacher`'s format, holding what every method of
the seed reads) and each distillation row trains from that cache (docs/teacher_cache.md); with
K >= the number of epochs no crop repeats. Rows record `teacher`: `none` (baseline), `live`
or `cache`.

Resumable: a finished row is stored in `WORKDIR/rows/<method>_s<seed>.json` and never
retrained; an unfinished one resumes from its checkpoints.
"""

from __future__ import annotations

import argparse

from kdflax.commands.common import (
    add_force_unlock,
    parse_with_overrides,
    run_reporting_errors,
    training_run,
)
from kdflax.config import load_config, save_config
from kdflax.pipeline.matrix import METHODS, run_matrix


def _int_list(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(',') if s.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}'
                                     ) from None


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax matrix', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'comma-separated, of: {", ".join(METHODS)}')
  parser.add_argument('--seeds', type=_int_list, default=[0, 1, 2])
  parser.add_argument('--cache_views', type=int, default=0,
                      help='K > 0: per seed, run the teacher once over K views of every train '
                           'image (a teacher cache in WORKDIR/cache_s<seed>, shared by that '
                           "seed's methods) instead of at every step")
  add_force_unlock(parser)
  args, rest = parse_with_overrides(parser, argv[1:])

  def run() -> int:
    config = load_config(args.config, rest)
    with training_run(argv, args.workdir, config, args.force_unlock):
      save_config(config, args.workdir)
      methods = [m.strip() for m in args.methods.split(',') if m.strip()]
      run_matrix(config, args.workdir, methods, args.seeds, cache_views=args.cache_views)
    return 0

  return run_reporting_errors('matrix', run)
