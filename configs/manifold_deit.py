"""Patch-level manifold distillation, the reference recipe: DeiT-Tiny student from a larger
ViT teacher, relations on the first 4 and last 4 blocks (w_patch 4, w_sample 0.1, w_rand 0.2,
K 192) plus soft KD through the distillation token.

The reference teacher is CaiT-S24, which kdflax does not ship; DeiT-Base stands in (convert
timm's deit_base_patch16_224 weights and fine-tune it, or point --config.teacher.checkpoint
at a fine-tuned model directory). Data defaults to the beans folders; change config.data.
"""

from kdflax.config import base_config
from kdflax.distill.objective import first_last_pairs


def get_config():
  config = base_config()
  config.data.root = '../shared/data/beans'
  config.data.eval_split = 'val'
  config.data.batch_size = 64
  config.data.randaugment_ops = 2

  config.teacher.name = 'deit_base_patch16_224'
  config.teacher.train.num_epochs = 30
  config.model.name = 'deit_tiny_distilled_patch16_224'
  config.model.overrides = {'drop_path_rate': 0.1}
  config.optim.learning_rate = 5e-4
  config.optim.weight_decay = 0.05
  config.train.num_epochs = 100

  config.loss.ce.weight = 1.0
  config.loss.ce.logits = 'cls_logits'
  config.loss.kd.weight = 1.0
  config.loss.kd.logits = 'dist_logits'
  config.loss.kd.temperature = 1.0
  config.loss.manifold.weight = 1.0
  config.loss.manifold.intra_weight = 4.0
  config.loss.manifold.inter_weight = 0.1
  config.loss.manifold.random_weight = 0.2
  config.loss.manifold.num_samples = 192
  config.loss.manifold.pairs = first_last_pairs(12, 12)
  return config
