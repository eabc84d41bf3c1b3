"""Quick start: the whole pipeline on the bundled bean-leaf sample, minutes on 2 CPU cores.

    kdflax pipeline --config configs/quickstart.py --workdir runs/quickstart

Teacher: a tiny Swin at 64 px; student: MobileNetV3-Small 0.5 at 64 px; distillation: logit KD
plus attention alignment of the Swin stages onto the MobileNetV3 stages. Data:
data/beans_sample (120 train / 45 val real photos, 3 classes). Small models trained from
scratch on 120 images: the numbers show the pipeline works, not what the method can do (see
configs/beans_*.py and the README's results for that).
"""

from kdflax.train.config import base_config


def get_config():
  config = base_config()
  config.seed = 0
  config.data.root = 'data/beans_sample'
  config.data.batch_size = 24
  config.data.eval_batch_size = 48
  config.data.cache = True
  config.data.crop_scale = (0.35, 1.0)

  config.teacher.name = 'swin_test_patch4_window4_64'
  config.teacher.train.num_epochs = 60
  config.teacher.train.log_every = 5
  config.teacher.train.eval_every = 50
  config.teacher.optim.learning_rate = 2e-3
  config.teacher.optim.weight_decay = 0.05

  config.model.name = 'mobilenetv3_small_050'
  config.model.image_size = 64
  config.train.num_epochs = 30
  config.train.log_every = 5
  config.train.eval_every = 50
  config.optim.learning_rate = 4e-3

  config.loss.ce.weight = 1.0
  config.loss.kd.weight = 1.0
  config.loss.kd.temperature = 4.0
  config.loss.attention.weight = 10.0
  config.loss.attention.pairs = {
      f'stage{i}': {'teacher': f'stage{i}', 'student': f'stage{i}'} for i in range(4)}

  config.export.precisions = ('fp32', 'int8')
  config.export.calibration_images = 120
  return config
