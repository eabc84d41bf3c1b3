"""Accelerator settings on top of another config: bfloat16 compute, larger batches.

    kdflax distill --config configs/colab_tpu.py:plantvillage_tomato_swin_l_mnv3 ...

The argument after ':' names a config file in this folder (default: the tomato set-up). On a
Colab TPU v2-8 the 8 cores form the 'data' mesh axis; batch sizes must divide by 8.
"""

from kdflax.train.config import load_sibling


def get_config(base: str = 'plantvillage_tomato_swin_l_mnv3'):
  config = load_sibling(__file__, base).get_config()
  config.train.compute_dtype = 'bfloat16'
  config.teacher.train.compute_dtype = 'bfloat16'
  config.data.batch_size = 256
  config.data.eval_batch_size = 512
  config.data.threads = 0
  config.data.prefetch = 4
  config.train.log_every = 50
  config.teacher.train.log_every = 50
  return config
