"""tiny.py distilled from a 64 px Swin teacher with KD, attention (window-attention map and
adapted feature) and manifold pairs: the teacher-cache tests' config."""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.teacher.name = 'swin_test_patch4_window4_64'
  config.teacher.overrides = {}
  config.loss.kd.weight = 1.0
  config.loss.attention.weight = 1.0
  config.loss.attention.pairs = {
      'win': {'teacher': 'stage1_attn', 'student': 'block1'},
      'feat': {'teacher': 'stage2', 'student': 'block0', 'distance': 'feature',
               'adapter': True},
  }
  config.loss.manifold.weight = 1.0
  config.loss.manifold.num_samples = 8
  config.loss.manifold.pairs = {'m': {'teacher': 'stage0', 'student': 'block1'}}
  config.train.num_steps = 3
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  return config
