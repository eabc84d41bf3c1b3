"""The hybrid objective: CE + logit KD + Swin window attention aligned onto MobileNetV3.

Each Swin stage's window attention becomes an "attention received" map, is resized to the
paired MobileNetV3 stage (56/28/14/7 grid at 224) and compared with the student's activation
map after spatial-softmax normalisation.
"""

from configs import beans_common


def get_config():
  config = beans_common.get_config()
  config.loss.ce.weight = 0.5
  config.loss.kd.weight = 0.5
  config.loss.kd.temperature = 4.0
  config.loss.attention.weight = 1.0
  config.loss.attention.normalize = 'softmax'
  config.loss.attention.temperature = 1.0
  config.loss.attention.pairs = beans_common.attention_pairs()
  return config
