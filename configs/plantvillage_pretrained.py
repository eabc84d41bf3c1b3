"""The beans recipe (`configs/beans_pretrained.py`) on a PlantVillage folder: apple or pepper.

    kdflax teacher --config configs/plantvillage_pretrained.py:apple --workdir runs/apple/teacher
    kdflax matrix --config configs/plantvillage_pretrained.py:apple --workdir runs/apple/matrix \
        --methods baseline,kd,hybrid --seeds 0,1,2 --cache_views 60 \
        --config.teacher.checkpoint=runs/apple/teacher/model_best

Data: `../shared/data/plantvillage_apple` (4 classes, 640 train / 160 val) or
`../shared/data/plantvillage_pepper_bell` (2 classes, 320 / 80): single leaves photographed on
a plain background, 256 px JPEGs, read at the recipe's 128 px (teacher) and 64 px (student).
Everything else (EfficientNet-Lite0 from `pretrained:efficientnet_lite0`, MobileNetV3-Small 0.5,
the schedules and loss weights) is the beans recipe, unchanged and not tuned on these folders.
"""

from configs import beans_pretrained

ROOTS = {
    'apple': '../shared/data/plantvillage_apple',
    'pepper': '../shared/data/plantvillage_pepper_bell',
}


def get_config(dataset: str = 'apple'):
  if dataset not in ROOTS:
    raise ValueError(f'configs/plantvillage_pretrained.py:<dataset>: expected one of '
                     f'{sorted(ROOTS)}, got {dataset!r}')
  config = beans_pretrained.get_config()
  config.data.root = ROOTS[dataset]
  # Calibrate int8 ranges on every train photo, as the beans recipe does.
  config.export.calibration_images = {'apple': 640, 'pepper': 320}[dataset]
  return config
