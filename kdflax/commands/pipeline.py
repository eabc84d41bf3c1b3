"""`kdflax pipeline`: teacher -> baseline student -> distilled student -> export -> report.

    kdflax pipeline --config configs/quickstart.py --workdir runs/quickstart

Stages run in `WORKDIR/{teacher,student,distill}` (each resumes from its own checkpoints, so
re-running a killed pipeline continues where it stopped; finished stages are not redone).
With `--config.teacher.checkpoint=MODEL_DIR` (e.g. from `kdflax convert`) the teacher stage is
skipped. The distilled student's best model is exported to `WORKDIR/export/` at each of
`config.export.precisions`, and a results table is printed and written to
`WORKDIR/results.md` / `results.json`.
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


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax pipeline', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  add_force_unlock(parser)
  args, rest = parse_with_overrides(parser, argv[1:])

  def run() -> int:
    from kdflax.pipeline.run import run_pipeline
    config = load_config(args.config, rest)
    with training_run(argv, args.workdir, config, args.force_unlock):
      save_config(config, args.workdir)
      run_pipeline(config, args.workdir)
    return 0

  return run_reporting_errors('pipeline', run)
