"""kdflax: knowledge distillation of vision models in JAX/Flax, exported to TFLite for phones.

Layers (data flows one way): models -> distill (pure loss functions) -> train -> export.
"""

__version__ = '0.1.0'
