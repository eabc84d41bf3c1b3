"""Decoupled KD (Zhao et al. 2022): CE + warm-up * (alpha TCKD + beta NCKD) at T = 4."""

from configs import beans_common


def get_config():
  config = beans_common.get_config()
  config.loss.dkd.weight = 1.0
  config.loss.dkd.alpha = 1.0
  config.loss.dkd.beta = 8.0
  config.loss.dkd.temperature = 4.0
  config.loss.dkd.warmup_steps = 100
  return config
