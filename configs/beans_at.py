"""Attention transfer (Zagoruyko & Komodakis): CE + AT on the activation maps of the four
stages (Swin stage outputs onto MobileNetV3 stage outputs, teacher maps resized)."""

from kdflax.train.config import load_sibling


def get_config():
  common = load_sibling(__file__, 'beans_common')
  config = common.get_config()
  config.loss.attention.weight = 500.0   # beta / 2 with beta = 1000, as in the paper
  config.loss.attention.normalize = 'l2'
  config.loss.attention.pairs = common.attention_pairs('stage{}')
  return config
