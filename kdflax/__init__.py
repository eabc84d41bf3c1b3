"""kdflax: knowledge distillation of vision models in JAX/Flax, exported to TFLite for phones.

Layers (data flows one way): data -> models -> distill (pure loss functions) -> config (the run
config: `kdflax.config.base_config`, `load_config`) -> train -> export (docs/architecture.md).
"""

__version__ = '0.1.0'
