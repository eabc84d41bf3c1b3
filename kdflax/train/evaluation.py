"""Top-1 / top-5 of a saved model directory on a split of the configured data."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections


def evaluate_model_dir(model_dir: str, config: ml_collections.ConfigDict,
                       split: str | None = None) -> dict:
  """Loads `model_dir` and evaluates it on `config.data` (`split` or its eval split).

  Returns:
    `{'model', 'model_dir', 'split', 'top1', 'top5', 'loss', ...}` (the eval metrics).
  """
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
  data = make_datasets(config.data, image_size=info.image_size, seed=config.seed)
  if len(data.labels) != info.num_classes:
    raise ValueError(f'{model_dir} has {info.num_classes} classes but the data has '
                     f'{len(data.labels)}')
  module, _ = info.create(dtype=jnp.float32)
  mesh = data_mesh()
  metrics = evaluate(make_eval_step(module, mesh), replicate(variables, mesh), data.eval(), mesh)
  return {'model': info.model, 'model_dir': model_dir, 'split': config.data.eval_split,
          **metrics}
