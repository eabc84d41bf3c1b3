"""`kdflax eval`: top-1 / top-5 of a model directory on a split of the configured data.

    kdflax eval --model runs/beans/hybrid --config configs/beans_hybrid.py [--split test]

`--model` is a model directory (from training or `kdflax convert`) or a workdir (its
`model_best/` is used). The data section of `--config` says where the images are; `--split`
replaces `config.data.eval_split`.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp

from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.train.config import load_config


def evaluate_model_dir(model_dir: str, config, split: str | None = None) -> dict:
  """Loads `model_dir` and evaluates it on `config.data` (`split` or its eval split)."""
  from kdflax.data.pipeline import make_datasets
  from kdflax.train import checkpoint as model_io
  from kdflax.train.loop import evaluate
  from kdflax.train.step import data_mesh, make_eval_step, replicate

  info, variables = model_io.load_model(model_dir)
  config = config.copy_and_resolve_references()
  if split:
    config.data.eval_split = split
  if not config.data.eval_split:
    raise ValueError('config.data.eval_split is empty: name a split with --split')
  data = make_datasets(config.data, image_size=info.image_size)
  if len(data.labels) != info.num_classes:
    raise ValueError(f'{model_dir} has {info.num_classes} classes but the data has '
                     f'{len(data.labels)}')
  module, _ = info.create(dtype=jnp.float32)
  mesh = data_mesh()
  metrics = evaluate(make_eval_step(module, mesh), replicate(variables, mesh), data.eval(), mesh)
  return {'model': info.model, 'model_dir': model_dir, 'split': config.data.eval_split,
          **metrics}


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax eval', description=__doc__.splitlines()[0])
  parser.add_argument('--model', required=True, help='model directory or workdir')
  parser.add_argument('--config', required=True, help='config whose data section to use')
  parser.add_argument('--split', default=None, help='split to evaluate (default: eval_split)')
  args, rest = parse_with_overrides(parser, argv[1:])

  def run() -> int:
    from kdflax.train.checkpoint import resolve_model_dir
    config = load_config(args.config, rest)
    result = evaluate_model_dir(resolve_model_dir(args.model), config, args.split)
    print(json.dumps(result))
    return 0

  return run_reporting_errors('eval', run)
