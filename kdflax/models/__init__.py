"""Flax model families (Swin, MobileNetV3, ViT/DeiT) and the name registry."""

from kdflax.models.registry import MODELS, ModelSpec, create_model, model_family, model_spec

__all__ = ['MODELS', 'ModelSpec', 'create_model', 'model_family', 'model_spec']
