"""Fine-tune the Swin-T teacher on beans (kdflax teacher --config configs/beans_teacher.py)."""

from kdflax.train.config import load_sibling


def get_config():
  return load_sibling(__file__, 'beans_common').get_config()
