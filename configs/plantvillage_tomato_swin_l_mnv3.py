"""The paper's set-up: Swin-L/384 teacher -> MobileNetV3-Large/224 student on PlantVillage
tomato (10 classes), hybrid loss (KD + resolution-aligned attention).

Data: TFDS `plant_village` (prepare it once with `tfds build plant_village` or
`tfds.load('plant_village')` on a machine with internet; kdflax never downloads), filtered to
its 10 tomato classes and split train/validation/test by hashing file names.

Teacher: convert ImageNet weights first, then fine-tune:
    kdflax convert --model swin_large_patch4_window12_384 \
        --checkpoint swin_large_patch4_window12_384.safetensors --out weights/swin_l_384
    kdflax teacher --config configs/plantvillage_tomato_swin_l_mnv3.py \
        --workdir runs/tomato/teacher --config.teacher.init_checkpoint=weights/swin_l_384
    kdflax distill --config configs/plantvillage_tomato_swin_l_mnv3.py \
        --workdir runs/tomato/hybrid --teacher_workdir runs/tomato/teacher

Swin-L stage grids at 384 are 96/48/24/12 (window 12); MobileNetV3 stages at 224 are
56/28/14/7: each teacher attention map is area-downsampled to its student stage.
On a TPU or GPU add `configs/colab_tpu.py`'s settings:
`--config configs/colab_tpu.py:plantvillage_tomato_swin_l_mnv3`.
"""

from kdflax.config import base_config


def get_config():
  config = base_config()
  config.data.source = 'tfds'
  config.data.name = 'plant_village'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.batch_size = 64
  config.data.eval_batch_size = 128
  config.data.crop_scale = (0.25, 1.0)
  config.data.randaugment_ops = 2

  config.teacher.name = 'swin_large_patch4_window12_384'
  config.teacher.overrides = {'drop_path_rate': 0.2}
  config.teacher.optim.learning_rate = 1e-4
  config.teacher.optim.weight_decay = 0.05
  config.teacher.optim.warmup_fraction = 0.1
  config.teacher.train.num_epochs = 10
  config.teacher.train.compute_dtype = 'bfloat16'

  config.model.name = 'mobilenetv3_large_100'
  config.model.image_size = 224
  config.optim.learning_rate = 2e-3
  config.optim.weight_decay = 0.02
  config.train.num_epochs = 60
  config.train.compute_dtype = 'bfloat16'
  config.train.ema_decay = 0.9998

  config.loss.ce.weight = 0.5
  config.loss.ce.label_smoothing = 0.1
  config.loss.kd.weight = 0.5
  config.loss.kd.temperature = 4.0
  config.loss.attention.weight = 1.0
  config.loss.attention.normalize = 'softmax'
  config.loss.attention.pairs = {
      f'stage{i}': {'teacher': f'stage{i}_attn', 'student': f'stage{i}'} for i in range(4)}

  config.export.precisions = ('fp32', 'fp16', 'int8')
  config.export.calibration_images = 200
  return config
