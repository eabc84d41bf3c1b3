"""Fine-tune the Swin-T teacher on beans (kdflax teacher --config configs/beans_teacher.py)."""

from configs import beans_common


def get_config():
  return beans_common.get_config()
