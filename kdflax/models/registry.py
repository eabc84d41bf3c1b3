"""Model registry: timm-style names -> Flax module + default image size.

Every model takes NHWC float32 images in [0, 1] and applies its own normalisation, so the
pipeline, the trainer and the exported `.tflite` all feed the same input.

    module, image_size = create_model('mobilenetv3_large_100', num_classes=10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
    logits = module.apply(variables, images)                      # (B, num_classes)
    logits, state = module.apply(variables, images, mutable=['intermediates'])

Family modules are imported lazily so that importing the registry stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How to build one named preset.

  Attributes:
    family: module under `kdflax.models` that defines the class (`swin`, `mobilenetv3`, `vit`,
      `efficientnet_lite`).
    cls_name: the `nn.Module` class in that module.
    image_size: default square input resolution.
    kwargs: constructor arguments of the preset (besides `num_classes`).
  """

  family: str
  cls_name: str
  image_size: int
  kwargs: Mapping[str, Any]


def _swin(image_size: int, embed_dim: int, depths, num_heads, window_size: int) -> ModelSpec:
  return ModelSpec('swin', 'SwinTransformer', image_size, dict(
      img_size=image_size, embed_dim=embed_dim, depths=tuple(depths),
      num_heads=tuple(num_heads), window_size=window_size))


def _mnv3(variant: str, width: float) -> ModelSpec:
  return ModelSpec('mobilenetv3', 'MobileNetV3', 224, dict(variant=variant, width_mult=width))


def _efficientnet_lite(variant: str, image_size: int, drop_rate: float) -> ModelSpec:
  return ModelSpec('efficientnet_lite', 'EfficientNetLite', image_size,
                   dict(variant=variant, drop_rate=drop_rate))


def _vit(image_size: int, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
         distilled: bool = False, inception_norm: bool = False) -> ModelSpec:
  kwargs = dict(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, distilled=distilled)
  if inception_norm:  # timm's vit_* pretrained_cfg: mean = std = 0.5 (DeiT uses ImageNet's)
    kwargs.update(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  return ModelSpec('vit', 'VisionTransformer', image_size, kwargs)


_SWIN_SIZES = {  # name: (embed_dim, depths, heads)
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_VIT_SIZES = {'tiny': (192, 12, 3), 'small': (384, 12, 6), 'base': (768, 12, 12)}

MODELS: dict[str, ModelSpec] = {}
for _size, (_dim, _depths, _heads) in _SWIN_SIZES.items():
  MODELS[f'swin_{_size}_patch4_window7_224'] = _swin(224, _dim, _depths, _heads, 7)
  MODELS[f'swin_{_size}_patch4_window12_384'] = _swin(384, _dim, _depths, _heads, 12)
# Tiny Swin for tests: 4 stages at 16/8/4/2 tokens, the last stage's window clipped to 2.
MODELS['swin_test_patch4_window4_64'] = _swin(64, 32, (1, 2, 2, 1), (1, 2, 4, 8), 4)

for _variant in ('large', 'small'):
  for _width in (0.5, 0.75, 1.0):
    MODELS[f'mobilenetv3_{_variant}_{int(_width * 100):03d}'] = _mnv3(_variant, _width)

# Resolution and dropout of each variant (`kdflax.models.efficientnet_lite.VARIANTS`).
for _n, (_res, _drop) in enumerate(((224, 0.2), (240, 0.2), (260, 0.3), (280, 0.3), (300, 0.3))):
  MODELS[f'efficientnet_lite{_n}'] = _efficientnet_lite(f'lite{_n}', _res, _drop)

for _size, (_dim, _depth, _heads) in _VIT_SIZES.items():
  MODELS[f'vit_{_size}_patch16_224'] = _vit(224, _dim, _depth, _heads, inception_norm=True)
  MODELS[f'deit_{_size}_patch16_224'] = _vit(224, _dim, _depth, _heads)
  MODELS[f'deit_{_size}_distilled_patch16_224'] = _vit(224, _dim, _depth, _heads, distilled=True)
MODELS['deit_base_patch16_384'] = _vit(384, 768, 12, 12)
# Tiny ViT for tests: 4x4 patches of 32 px images, 2 blocks.
MODELS['vit_test_patch8_32'] = _vit(32, 32, 2, 2, patch_size=8)
MODELS['deit_test_distilled_patch8_32'] = _vit(32, 32, 2, 2, patch_size=8, distilled=True)


def model_spec(name: str) -> ModelSpec:
  """The preset called `name`; a clear error listing the known names otherwise."""
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(
        f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}') from None


def model_family(name: str) -> str:
  """`swin`, `mobilenetv3`, `vit` or `efficientnet_lite` for a registered name."""
  return model_spec(name).family


def create_model(name: str, num_classes: int, **overrides: Any) -> tuple[nn.Module, int]:
  """Builds a registered model.

  Args:
    name: a timm-style name from `MODELS`, e.g. `swin_large_patch4_window12_384`.
    num_classes: size of the classifier head.
    **overrides: constructor fields to change, e.g. `drop_path_rate=0.1`, `dtype=jnp.bfloat16`.
      For Swin and ViT, `img_size` also changes the default image size returned.

  Returns:
    `(module, image_size)`: an unbound `nn.Module` taking `(B, H, W, 3)` float images in
    [0, 1] and returning `(B, num_classes)` logits, and the square resolution it expects.
  """
  spec = model_spec(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  family = importlib.import_module(f'kdflax.models.{spec.family}')
  cls = getattr(family, spec.cls_name)
  # JSON (model.json) and flag overrides give lists where the modules declare tuples.
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in {**spec.kwargs, **overrides}.items()}
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - known)
  if unknown:
    raise ValueError(f'{name}: unknown model option(s) {unknown}; '
                     f'options are {sorted(known - {"parent", "name"})}')
  module = cls(num_classes=num_classes, **kwargs)
  image_size = int(kwargs.get('img_size', spec.image_size))
  return module, image_size
