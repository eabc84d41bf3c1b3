"""Shared base of the beans_* configs: the real iBean bean-leaf photos, sized for CPU runs.

Data: `../shared/data/beans` (image folders, 1,034 train / 133 val field photos, 3 classes;
the same data and splits as TFDS `beans`). With TFDS prepared on your machine instead:
`--config.data.source=tfds --config.data.name=beans --config.data.eval_split=validation`.

Teacher: Swin-T (window 7) at 112 px; student: MobileNetV3-Large 1.0 at 112 px. 112 px keeps
a teacher epoch to minutes on a laptop CPU; on a GPU/TPU use 224 (`--config.model.image_size`,
`--config.teacher.overrides.img_size`). Start the teacher from converted ImageNet weights when
you have them: `--config.teacher.init_checkpoint=DIR` (see `kdflax convert`).
"""

from kdflax.config import base_config

STUDENT_STAGES = ('stage0', 'stage1', 'stage2', 'stage3')


def get_config():
  config = base_config()
  config.data.root = '../shared/data/beans'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.batch_size = 32
  config.data.eval_batch_size = 64
  config.data.crop_scale = (0.25, 1.0)
  config.data.cache = True

  config.teacher.name = 'swin_tiny_patch4_window7_224'
  config.teacher.overrides = {'img_size': 112, 'drop_path_rate': 0.1}
  config.teacher.optim.learning_rate = 5e-4
  config.teacher.optim.weight_decay = 0.05
  config.teacher.train.num_epochs = 30
  config.teacher.train.ema_decay = 0.0

  config.model.name = 'mobilenetv3_large_100'
  config.model.image_size = 112
  config.optim.learning_rate = 2e-3
  config.optim.weight_decay = 0.02
  config.train.num_epochs = 30
  return config


def attention_pairs(teacher_key: str = 'stage{}_attn') -> dict:
  """Swin stage i (window attention, or its output with 'stage{}') -> MobileNetV3 stage i."""
  return {f'stage{i}': {'teacher': teacher_key.format(i), 'student': f'stage{i}'}
          for i in range(4)}
