"""Vanilla KD (Hinton): CE + KL at T = 4 (kdflax distill --teacher_workdir ...)."""

from configs import beans_common


def get_config():
  config = beans_common.get_config()
  config.loss.ce.weight = 0.5
  config.loss.kd.weight = 0.5
  config.loss.kd.temperature = 4.0
  return config
