"""`kdflax teacher | student | distill`: run one training stage from a config file.

    kdflax teacher --config configs/beans_teacher.py --workdir runs/beans/teacher
    kdflax student --config configs/beans_baseline.py --workdir runs/beans/student
    kdflax distill --config configs/beans_hybrid.py --workdir runs/beans/hybrid \
        --teacher_workdir runs/beans/teacher [--config.optim.learning_rate=3e-3 ...]

`--workdir` holds everything of the run: the resolved `config.json`, Orbax checkpoints (a
restart resumes from the latest), `metrics.jsonl`, TensorBoard events, `model_best/` and
`model_final/` model directories, and `results.json`. Any config key can be overridden with
`--config.key=value`.

One run per workdir: a second run on a workdir in use is refused (exit 4) naming the run that
holds it; `--force_unlock` takes over a lock left on another host (docs/reliability.md).
Ctrl-C or SIGTERM finishes the step under way, saves a checkpoint and exits 130 / 143 with one
line naming the command that resumes.
"""

from __future__ import annotations

import argparse
import json

import ml_collections

from kdflax.commands.common import (
    add_force_unlock,
    parse_with_overrides,
    run_with_config,
    training_run,
)
from kdflax.train.checkpoint import resolve_model_dir


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Known flags + the `--config.*` overrides (anything else is a usage error)."""
  command = argv[0]
  parser = argparse.ArgumentParser(prog=f'kdflax {command}', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='config file (configs/*.py)')
  parser.add_argument('--workdir', required=True, help='directory of this run')
  if command == 'distill':
    parser.add_argument('--teacher_workdir', default=None,
                        help='workdir of a `kdflax teacher` run (uses its model_best/), or a '
                             'model directory (from `kdflax convert`)')
  add_force_unlock(parser)
  return parse_with_overrides(parser, argv[1:])


def main(argv: list[str]) -> int:
  return run_with_config(argv, parse_args,
                         lambda command, args, config: _run(argv, args, config))


def _run(argv: list[str], args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
  """Runs stage `argv[0]` in `args.workdir` (locked, see `training_run`); prints its summary
  as JSON."""
  from kdflax.train.stages import run_stage
  teacher_dir = resolve_model_dir(getattr(args, 'teacher_workdir', None))
  with training_run(argv, args.workdir, config, args.force_unlock):
    summary = run_stage(config, args.workdir, argv[0], teacher_dir=teacher_dir)
  print(json.dumps({k: summary[k] for k in ('stage', 'model', 'step', 'best', 'final',
                                           'model_dir') if k in summary}, indent=2))
  return 0
