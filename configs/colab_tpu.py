"""Accelerator settings on top of another config: bfloat16 compute, larger batches.

    kdflax distill --config configs/colab_tpu.py:plantvillage_tomato_swin_l_mnv3 ...

The argument after ':' names a config file in this folder (default: the tomato set-up),
imported as `configs.<NAME>`. On a Colab TPU v2-8 the 8 cores form the 'data' mesh axis;
batch sizes must divide by 8.
"""

import importlib


def get_config(base: str = 'plantvillage_tomato_swin_l_mnv3'):
  config = importlib.import_module(f'configs.{base}').get_config()
  config.train.compute_dtype = 'bfloat16'
  config.teacher.train.compute_dtype = 'bfloat16'
  config.data.batch_size = 256
  config.data.eval_batch_size = 512
  config.data.threads = 0
  config.data.prefetch = 4
  config.train.log_every = 50
  config.teacher.train.log_every = 50
  # On an accelerator the teacher runs live at every step: a committed teacher cache (the
  # 2-core demo's) was computed in float32 and would be refused here.
  config.teacher.cache = ''
  return config
