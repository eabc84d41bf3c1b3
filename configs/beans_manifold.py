"""Hybrid + patch-level manifold distillation: CE + KD + attention + manifold relations
between the Swin stage outputs and the MobileNetV3 stage outputs (H*W tokens each)."""

from kdflax.train.config import load_sibling


def get_config():
  common = load_sibling(__file__, 'beans_common')
  config = load_sibling(__file__, 'beans_hybrid').get_config()
  config.loss.manifold.weight = 1.0
  config.loss.manifold.pairs = common.attention_pairs('stage{}')
  return config
