"""Baseline MobileNetV3-Large on beans, cross-entropy only (kdflax student)."""

from configs import beans_common


def get_config():
  return beans_common.get_config()
