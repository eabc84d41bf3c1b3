"""Vision Transformer / DeiT in Flax, numerically identical to timm's `VisionTransformer`.

Covers timm's `vit_{tiny,small,base}_patch16_224`, `deit_*_patch16_224` and
`deit_*_distilled_patch16_224` (`VisionTransformerDistilled`):

    image (B, H, W, 3) in [0, 1] -> normalise -> patch conv (p x p, stride p) -> (B, N, C)
    -> [cls (, dist)] tokens prepended -> + learned position embedding (covers the prefix tokens)
    -> depth x pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x))
    -> final LayerNorm -> head(cls token)      distilled: (head(cls) + head_dist(dist)) / 2

Numerics as timm 1.0.31: LayerNorm eps 1e-6 (timm's `LayerNorm` default for these models),
qkv with bias, exact erf GELU, attention scale `head_dim ** -0.5`, stochastic depth rates
linear from 0 to `drop_path_rate` over the blocks, `drop_rate` = dropout on the pooled
token(s) before the head (timm's `head_drop`; timm 1.0 no longer applies it elsewhere).

Intermediates (top-level scope of `'intermediates'`, only when that collection is mutable):
`block{i}` `(B, P + N, C)` = output of block i (timm `blocks.{i}`), P = `num_prefix_tokens`;
distilled models also sow `cls_logits` and `dist_logits` `(B, num_classes)` in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from kdflax.models.layers import TRUNC_NORMAL_02, DtypeModule, Mlp, dense
from kdflax.models.layout import ModelLayout
from kdflax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize

LN_EPS = 1e-6


class Attention(DtypeModule):
  """Multi-head self-attention with a fused qkv projection: `(B, T, C)` -> `(B, T, C)`."""

  num_heads: int
  attn_drop_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    b, t, c = x.shape
    head_dim = c // self.num_heads
    # timm: qkv(x).reshape(B, T, 3, heads, head_dim): features ordered (3, heads, head_dim).
    qkv = dense(3 * c, 'qkv', self.dtype, self.param_dtype)(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]            # (B, T, heads, head_dim)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim ** -0.5, k)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attn_drop_rate, deterministic=not train)(weights)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, t, c)
    return dense(c, 'proj', self.dtype, self.param_dtype)(out)


class Block(DtypeModule):
  """Pre-norm transformer block: `(B, T, C)` -> `(B, T, C)`."""

  num_heads: int
  mlp_ratio: float = 4.0
  attn_drop_rate: float = 0.0
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    c = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    # Stochastic depth: one keep/drop decision per sample, survivors scaled by 1 / keep.
    drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    y = Attention(self.num_heads, self.attn_drop_rate, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='attn')(norm('norm1')(x), train)
    x = x + drop_path(y)
    y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, param_dtype=self.param_dtype,
            name='mlp')(norm('norm2')(x))
    return x + drop_path(y)


class VisionTransformer(DtypeModule):
  """timm ViT / DeiT (optionally distilled) taking NHWC images in [0, 1].

  Attributes:
    num_classes: classifier size (the distillation head has the same size).
    img_size: square input resolution the position embedding is built for.
    patch_size: side of the square patches (the patch-embedding conv's kernel and stride).
    embed_dim: token width C.
    depth: number of transformer blocks.
    num_heads: attention heads per block.
    distilled: DeiT distillation token and `head_dist` (timm `VisionTransformerDistilled`).
    mlp_ratio: MLP hidden width / C.
    drop_rate: dropout on the pooled token(s) before the head(s) (timm `head_drop`).
    attn_drop_rate: dropout on the attention weights.
    drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
    mean, std: per-channel normalisation of the [0, 1] input (the timm pretrained_cfg:
      ImageNet for DeiT, 0.5 / 0.5 for the original vit_* weights).
    dtype: compute dtype; the logits are float32 regardless.
    param_dtype: parameter dtype.
  """

  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  distilled: bool = False
  mlp_ratio: float = 4.0
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens: the class token, plus the distillation token."""
    return 2 if self.distilled else 1

  @property
  def grid_size(self) -> int:
    """Patch tokens per side: the token grid is `grid_size x grid_size`."""
    return self.img_size // self.patch_size

  def distill_layout(self) -> ModelLayout:
    """`block{i}` tokens: `num_prefix_tokens` first, then a `grid_size` square grid."""
    return ModelLayout(num_prefix_tokens=self.num_prefix_tokens,
                       token_grid=(self.grid_size, self.grid_size))

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """`(B, img_size, img_size, 3)` in [0, 1] -> `(B, num_classes)` float32 logits."""
    if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
      raise ValueError(f'{type(self).__name__} expects images (B, {self.img_size}, '
                       f'{self.img_size}, 3), got {tuple(x.shape)}')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not divisible by num_heads '
                       f'{self.num_heads}')
    x = normalize(x, self.dtype, self.mean, self.std)

    c, p = self.embed_dim, self.patch_size
    x = nn.Conv(c, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='patch_embed')(x)
    b = x.shape[0]
    x = x.reshape(b, -1, c)                                        # (B, N, C), row-major grid

    prefix = [self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, c),
                         self.param_dtype)]
    if self.distilled:
      prefix.append(self.param('dist_token', TRUNC_NORMAL_02, (1, 1, c), self.param_dtype))
    prefix = [jnp.broadcast_to(t.astype(self.dtype), (b, 1, c)) for t in prefix]
    x = jnp.concatenate([*prefix, x], axis=1)                     # (B, P + N, C)
    pos_embed = self.param('pos_embed', TRUNC_NORMAL_02, (1, x.shape[1], c), self.param_dtype)
    x = x + pos_embed.astype(self.dtype)

    rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.attn_drop_rate, float(rates[i]),
                dtype=self.dtype, param_dtype=self.param_dtype, name=f'blocks_{i}')(x, train)
      self.sow('intermediates', f'block{i}', x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='norm')(x)

    head_drop = nn.Dropout(self.drop_rate, deterministic=not train)
    head = lambda name, token: dense(self.num_classes, name, self.dtype, self.param_dtype)(
        head_drop(token)).astype(jnp.float32)
    logits = head('head', x[:, 0])
    if not self.distilled:
      return logits
    dist_logits = head('head_dist', x[:, 1])
    self.sow('intermediates', 'cls_logits', logits)
    self.sow('intermediates', 'dist_logits', dist_logits)
    return (logits + dist_logits) / 2
