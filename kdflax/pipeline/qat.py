"""Quantisation-aware fine-tuning: the student trained on a few epochs through simulated int8.

    summary = qat_stage(config, 'runs/x/distill/model_best', 'runs/x/qat', 'distill',
                        teacher_dir='runs/x/teacher/model_best')
    summary['model_dir']   # the fine-tuned student; its int8 export is the one to ship

With `config.export.qat.epochs > 0` the pipeline runs this after the student stage and
exports its int8 file from the result. The stage is the student's own stage (same objective,
data and teacher) started from the student's best model, with the model built with
`quantize=True` (`kdflax.models.quant`: int8 kernels per output channel, int8 activations
with running ranges, BatchNorm statistics frozen), `config.export.qat.epochs` epochs on a
cosine schedule from `config.export.qat.learning_rate`, no warm-up. The model
directory it writes records `quantize: true`, so `kdflax eval` on it reports the simulated
int8 accuracy; export always lowers the float graph and lets the converter round it.

The same stage from the command line:

    kdflax distill --config C --workdir W --config.model.init_checkpoint=STUDENT_DIR \\
        --config.model.overrides.quantize=True --config.train.num_epochs=1 \\
        --config.optim.learning_rate=1e-4 --config.optim.warmup_fraction=0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections


def qat_config(config: ml_collections.ConfigDict, student_dir: str) -> ml_collections.ConfigDict:
  """A copy of `config` for the fine-tune of `student_dir` (see the module docstring).

  Raises:
    ValueError: the student's model family has no simulated int8 (`quantize` field).
  """
  from kdflax.models import registry

  module, _ = registry.create_model(config.model.name, 1, **dict(config.model.overrides))
  if 'quantize' not in {f.name for f in dataclasses.fields(module)}:
    raise ValueError(f'config.export.qat.epochs > 0: {config.model.name} has no simulated '
                     'int8 for quantisation-aware fine-tuning (MobileNetV3 has); set it to 0')
  out = ml_collections.ConfigDict(config.to_dict())  # unlocked: overrides gains a key
  out.model.init_checkpoint = student_dir
  out.model.overrides.quantize = True
  out.train.num_epochs = int(config.export.qat.epochs)
  out.train.num_steps = 0
  out.optim.learning_rate = float(config.export.qat.learning_rate)
  out.optim.warmup_steps = 0
  out.optim.warmup_fraction = 0.0
  return out


def qat_stage(config: ml_collections.ConfigDict, student_dir: str, workdir: str, stage: str,
              teacher_dir: str | None = None, log_fn: Callable[[str], None] = print
              ) -> dict[str, Any]:
  """Runs the fine-tune in `workdir`; returns the stage summary (`model_dir`: its best model).

  `stage` is the student's stage ('student' or 'distill'); resumable and not rebuilt when
  finished with the same config, like every stage.
  """
  from kdflax.train.stages import run_stage

  log_fn(f'[qat] {config.export.qat.epochs} epoch(s) of {stage} with simulated int8 from '
         f'{student_dir}')
  return run_stage(qat_config(config, student_dir), workdir, stage, teacher_dir=teacher_dir,
                   log_fn=log_fn)
