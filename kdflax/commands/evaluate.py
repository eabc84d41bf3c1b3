"""`kdflax eval`: top-1 / top-5 of a model directory on a split of the configured data.

    kdflax eval --model runs/beans/hybrid --config configs/beans_hybrid.py [--split test]

`--model` is a model directory (from training or `kdflax convert`) or a workdir (its
`model_best/` is used). The data section of `--config` says where the images are; `--split`
replaces `config.data.eval_split`.
"""

from __future__ import annotations

import argparse
import json

from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.config import load_config


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax eval', description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, help='model directory or workdir')
  parser.add_argument('--config', required=True, help='config whose data section to use')
  parser.add_argument('--split', default=None, help='split to evaluate (default: eval_split)')
  args, rest = parse_with_overrides(parser, argv[1:])

  def run() -> int:
    from kdflax.train.checkpoint import resolve_model_dir
    from kdflax.train.evaluation import evaluate_model_dir
    config = load_config(args.config, rest)
    result = evaluate_model_dir(resolve_model_dir(args.model), config, args.split)
    print(json.dumps(result))
    return 0

  return run_reporting_errors('eval', run)
