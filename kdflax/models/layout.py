"""What a model family tells the distillation code about its sown intermediates.

    layout = layout_of(module)     # ModelLayout: window-attention keys, prefix tokens, grid

Each family declares its own layout with a `distill_layout()` method (Swin: which
`stage{i}_attn` tensors are window attention and their `(height, width, window, shift)`;
ViT/DeiT: the class/distillation tokens before the patch tokens and the token grid); a model
without the method (a CNN such as MobileNetV3) sows plain `(B, H, W, C)` feature maps and has
the empty layout. `kdflax.distill.objective.Objective` reads these facts; training never
guesses them from a model's attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelLayout:
  """Static per-model facts the objective needs to read intermediates.

  Attributes:
    window_attention: intermediates key -> Swin `(height, width, window, shift)` of a
      `(B * nW, heads, window^2, window^2)` window-attention tensor.
    num_prefix_tokens: class/distillation tokens before the patch tokens in `(B, P + N, C)`.
    token_grid: `(h, w)` of the patch tokens when `N` is not a square.
  """

  window_attention: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  num_prefix_tokens: int = 0
  token_grid: tuple[int, int] | None = None

  @classmethod
  def create(cls, layout: ModelLayout | Mapping[str, Any] | None, role: str) -> ModelLayout:
    """`layout` as a `ModelLayout` (None: empty; a dict: its fields, unknown keys rejected)."""
    if layout is None:
      return cls()
    if isinstance(layout, cls):
      return layout
    if not isinstance(layout, Mapping):
      raise ValueError(f'{role}_layout must be a ModelLayout or a dict, got {type(layout)}')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(layout) - known)
    if unknown:
      raise ValueError(f'{role}_layout: unknown key(s) {unknown}; expected {sorted(known)}')
    return cls(**layout)


def layout_of(module: Any) -> ModelLayout:
  """The layout `module` declares (`distill_layout()`), or the empty layout of a CNN."""
  declare = getattr(module, 'distill_layout', None)
  return declare() if declare is not None else ModelLayout()
