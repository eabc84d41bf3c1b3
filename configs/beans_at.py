"""Attention transfer (Zagoruyko & Komodakis): CE + AT on the activation maps of the four
stages (Swin stage outputs onto MobileNetV3 stage outputs, teacher maps resized)."""

from configs import beans_common


def get_config():
  config = beans_common.get_config()
  config.loss.attention.weight = 500.0   # beta / 2 with beta = 1000, as in the paper
  config.loss.attention.normalize = 'l2'
  config.loss.attention.pairs = beans_common.attention_pairs('stage{}')
  return config
