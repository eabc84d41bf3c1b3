"""The run config's schema: every section with its defaults, composed by `base_config()`.

Config files in `configs/` define `get_config()` that starts from `base_config()` and sets
what differs. Sections:

    seed          the run's one seed: parameter init, dropout, data order, augmentation and
                  sampling (the data pipeline is given it: `make_datasets(..., seed=)`)
    data          input pipeline, declared by the data package
                  (`kdflax.data.config.default_data_config()`)
    model         the student: name, overrides (create_model fields), image_size (0: default),
                  init_checkpoint (a model dir to start from; heads of another size re-init)
    teacher       the teacher: name, overrides, image_size, init_checkpoint (for fine-tuning),
                  checkpoint (model dir used by `distill`; empty: the pipeline's teacher stage),
                  cache (a `kdflax cache-teacher` directory: `distill` reads the teacher's
                  outputs from it instead of running the teacher; empty: live teacher),
                  and its own `optim` and `train` sections for the `teacher` stage
    loss          distillation objective, declared by the distill package from each registered
                  term's defaults (`kdflax.distill.objective.default_loss_config()`); the
                  teacher and baseline stages use only its cross-entropy settings
    optim         optimizer of the student stages (`default_optim_config`)
    train         lengths and intervals of the student stages (`default_train_config`); the
                  batch sizes are `data.batch_size` / `data.eval_batch_size`
    export        what `pipeline` exports at the end (`default_export_config`)
    distributed   multi-host set-up (`jax.distributed.initialize`)

Each package below `kdflax.config` owns its section's defaults where it has one (data, loss);
this module owns the rest as data and composes them. The packages that read a section are
handed that section; they never import `kdflax.config`.
"""

from __future__ import annotations

import ml_collections

from kdflax.data.config import default_data_config


def default_optim_config() -> ml_collections.ConfigDict:
  """Keys of `config.optim` (and `config.teacher.optim`; read by `kdflax.train.optim`).

  name: 'adamw' | 'sgd' | 'lamb'.
  learning_rate: peak learning rate (after warm-up).
  warmup_steps: linear warm-up from 0; `warmup_fraction` is used when this is 0.
  warmup_fraction: warm-up as a fraction of the total steps.
  schedule: 'cosine' (to `final_lr_fraction * learning_rate`) | 'constant'.
  final_lr_fraction: where the cosine ends, relative to the peak.
  weight_decay: decoupled weight decay (adamw, lamb; L2-style for sgd), not applied to
    biases, norms and 1-D parameters.
  momentum: sgd momentum; b1/b2: Adam betas.
  grad_clip_norm: clip the global gradient norm to this (0 disables).
  """
  return ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-3, warmup_steps=0, warmup_fraction=0.05,
      schedule='cosine', final_lr_fraction=0.0, weight_decay=0.05, momentum=0.9,
      b1=0.9, b2=0.999, grad_clip_norm=1.0))


def default_train_config() -> ml_collections.ConfigDict:
  """Keys of `config.train` (and `config.teacher.train`).

  num_epochs / num_steps: length; num_steps > 0 wins (an epoch is
    `num_train // data.batch_size` steps).
  log_every, eval_every, checkpoint_every: in steps (0 for eval/checkpoint: once per epoch).
  keep_checkpoints: how many recent checkpoints to keep.
  compute_dtype: 'float32' or 'bfloat16' (params stay float32).
  ema_decay: 0 disables the EMA of the weights; eval and export use the EMA when on.
  progress: show a progress bar.
  """
  return ml_collections.ConfigDict(dict(
      num_epochs=10, num_steps=0, log_every=20, eval_every=0, checkpoint_every=0,
      keep_checkpoints=2, compute_dtype='float32', ema_decay=0.0, progress=True))


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """Keys of `config.model` (the student) and the model part of `config.teacher`.

  name: a registered model name (`kdflax.models.registry`).
  overrides: create_model fields (free-form; the registry checks them).
  image_size: input resolution (0: the model's default).
  init_checkpoint: a model directory to start from (heads of another size re-initialise).
  """
  return ml_collections.ConfigDict(dict(
      name=name, overrides=ml_collections.ConfigDict(), image_size=0, init_checkpoint=''))


def default_export_config() -> ml_collections.ConfigDict:
  """Keys of `config.export` (what `pipeline` exports at the end; `kdflax.pipeline.run`).

  precisions: .tflite files to write, of 'fp32', 'fp16', 'int8'.
  calibration_images: int8 calibration photos, from the train split.
  eval_images: photos for parity and accuracy, from the eval split.
  enabled: False skips the export stage.
  activation_percentile: int8 activation ranges are this percentile interval of the
    calibration activations (100, the default: their min/max, as the converter does;
    `kdflax.export.int8_ranges`; the demo uses 99.99).
  qat: epochs > 0: the int8 file comes from the student fine-tuned that many epochs with
    simulated int8 at `qat.learning_rate` (`kdflax.pipeline.qat`).
  """
  return ml_collections.ConfigDict(dict(
      precisions=('fp32', 'int8'), calibration_images=64, eval_images=500, enabled=True,
      activation_percentile=100.0,
      qat=ml_collections.ConfigDict(dict(epochs=0, learning_rate=1e-4))))


def default_distributed_config() -> ml_collections.ConfigDict:
  """Keys of `config.distributed` (`jax.distributed.initialize`; empty address: one host)."""
  return ml_collections.ConfigDict(dict(coordinator_address='', num_processes=1, process_id=0))


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (see the module docstring)."""
  from kdflax.distill.objective import default_loss_config  # imports JAX: only when needed

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = default_data_config()
  config.model = default_model_config('mobilenetv3_large_100')
  config.teacher = default_model_config('swin_tiny_patch4_window7_224')
  config.teacher.checkpoint = ''
  config.teacher.cache = ''
  config.teacher.optim = default_optim_config()
  config.teacher.train = default_train_config()
  config.loss = default_loss_config()
  config.optim = default_optim_config()
  config.train = default_train_config()
  config.export = default_export_config()
  config.distributed = default_distributed_config()
  return config
