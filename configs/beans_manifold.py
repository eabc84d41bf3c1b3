"""Hybrid + patch-level manifold distillation: CE + KD + attention + manifold relations
between the Swin stage outputs and the MobileNetV3 stage outputs (H*W tokens each)."""

from configs import beans_common, beans_hybrid


def get_config():
  config = beans_hybrid.get_config()
  config.loss.manifold.weight = 1.0
  config.loss.manifold.pairs = beans_common.attention_pairs('stage{}')
  return config
