"""A seconds-long run for loop tests: tiny ViT student, 32 px, bundled bean photos.

The data root and everything else are overridden by the tests with --config.key=value.
"""

from kdflax.config import base_config


def get_config():
  config = base_config()
  config.data.root = 'data/beans_sample'
  config.data.batch_size = 8
  config.data.eval_batch_size = 16
  config.data.cache = True
  config.data.threads = 1
  config.model.name = 'vit_test_patch8_32'
  config.teacher.name = 'swin_test_patch4_window4_64'
  config.teacher.overrides = {'img_size': 32, 'window_size': 2, 'embed_dim': 16,
                              'depths': (1, 1, 1, 1), 'num_heads': (1, 1, 2, 2)}
  config.teacher.train.num_steps = 4
  config.teacher.train.progress = False
  config.train.num_steps = 12
  config.train.log_every = 1
  config.train.eval_every = 6
  config.train.checkpoint_every = 1
  config.train.progress = False
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 2
  config.export.enabled = False
  return config
