"""Baseline MobileNetV3-Large on beans, cross-entropy only (kdflax student)."""

from kdflax.train.config import load_sibling


def get_config():
  return load_sibling(__file__, 'beans_common').get_config()
