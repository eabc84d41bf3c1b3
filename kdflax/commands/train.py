"""`kdflax teacher | student | distill`: run one training stage from a config file.

    kdflax teacher --config configs/beans_teacher.py --workdir runs/beans/teacher
    kdflax student --config configs/beans_baseline.py --workdir runs/beans/student
    kdflax distill --config configs/beans_hybrid.py --workdir runs/beans/hybrid \
        --teacher_workdir runs/beans/teacher [--config.optim.learning_rate=3e-3 ...]

`--workdir` holds everything of the run: the resolved `config.json`, Orbax checkpoints (a
restart resumes from the latest), `metrics.jsonl`, TensorBoard events, `model_best/` and
`model_final/` model directories, and `results.json`. Any config key can be overridden with
`--config.key=value`.
"""

from __future__ import annotations

import argparse
import json

from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.config import load_config
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
  return parse_with_overrides(parser, argv[1:])


def main(argv: list[str]) -> int:
  command = argv[0]
  args, overrides = parse_args(argv)

  def run() -> int:
    from kdflax.train.stages import run_stage
    config = load_config(args.config, overrides)
    teacher_dir = resolve_model_dir(getattr(args, 'teacher_workdir', None))
    summary = run_stage(config, args.workdir, command, teacher_dir=teacher_dir)
    print(json.dumps({k: summary[k] for k in ('stage', 'model', 'step', 'best', 'final',
                                             'model_dir') if k in summary}, indent=2))
    return 0

  return run_reporting_errors(command, run)
