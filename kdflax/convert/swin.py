"""Swin Transformer checkpoints (timm, original Microsoft, Hugging Face) -> Flax variables.

Three key layouts are accepted and first renamed to the current timm layout:

- timm >= 0.9: `layers.{i}.downsample` at the START of stage i (i > 0), `head.fc.weight`.
- original / old timm: `layers.{i}.downsample` at the END of stage i, i.e. before stage i + 1,
  `head.weight`, plus `relative_position_index` / `attn_mask` buffers (ignored). Detected, as
  timm's own `checkpoint_filter_fn` does, by `layers.0.downsample.reduction.weight`.
- Hugging Face transformers `SwinForImageClassification`: `swin.embeddings...`,
  `swin.encoder.layers.{i}.blocks.{j}...` with separate query/key/value Linears (both the
  `attention.self.query` naming of Hub checkpoints and the `attention.q_proj` naming of
  transformers >= 5), downsample at the END of each stage, `swin.layernorm`, `classifier`.

The timm layout then maps onto the Flax module tree of `kdflax.models.swin` (`layers.{i}` ->
`layers_{i}`, `blocks.{j}` -> `blocks_{j}`, `head.fc` -> `head`): Linear (out, in) -> kernel
(in, out), Conv OIHW -> HWIO, LayerNorm weight -> scale. Validation against the module's
shapes is done by `kdflax.convert.timm`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import numpy as np

_BLOCK_KEY = re.compile(r'^(?:swin\.encoder\.)?layers\.\d+\.blocks\.\d+\.')
_CLASSIFIERS = ('head.fc.weight', 'head.weight', 'classifier.weight')
_HF_PREFIX = 'swin.'

# Hugging Face block sub-keys -> timm block sub-keys (both transformers namings).
_HF_BLOCK_RENAMES = (
    ('layernorm_before.', 'norm1.'),
    ('layernorm_after.', 'norm2.'),
    ('attention.relative_position_bias.relative_position_bias_table',
     'attn.relative_position_bias_table'),
    ('attention.self.relative_position_bias_table', 'attn.relative_position_bias_table'),
    ('attention.relative_position_bias.relative_position_index', 'attn.relative_position_index'),
    ('attention.self.relative_position_index', 'attn.relative_position_index'),
    ('attention.o_proj.', 'attn.proj.'),
    ('attention.output.dense.', 'attn.proj.'),
    ('mlp.fc1.', 'mlp.fc1.'),
    ('intermediate.dense.', 'mlp.fc1.'),
    ('mlp.fc2.', 'mlp.fc2.'),
    ('output.dense.', 'mlp.fc2.'),
)
_HF_QKV = {  # (q, k, v) sub-key prefixes in each naming
    'new': ('attention.q_proj.', 'attention.k_proj.', 'attention.v_proj.'),
    'hub': ('attention.self.query.', 'attention.self.key.', 'attention.self.value.'),
}
_NORMS = ('norm', 'norm1', 'norm2')
# Modules (current timm names) that hold parameters; anything else is reported as unused.
_MODULE = re.compile(
    r'^(patch_embed\.(proj|norm)|layers\.\d+\.downsample\.(norm|reduction)|'
    r'layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)|'
    r'norm|head\.fc)$')


def is_swin(state_dict: Mapping[str, object]) -> bool:
  """Whether the dict has Swin (v1) window-attention blocks in any accepted layout."""
  return any(_BLOCK_KEY.match(k) and k.endswith('relative_position_bias_table')
             for k in state_dict)


def num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
  """Classifier size of a Swin checkpoint; None if it is not a Swin classifier checkpoint."""
  if not is_swin(state_dict):
    return None
  for key in _CLASSIFIERS:
    if key in state_dict and np.ndim(state_dict[key]) == 2:
      return int(np.shape(state_dict[key])[0])
  return None


def _from_hf(state_dict: Mapping[str, np.ndarray]
             ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """HF keys -> timm keys; also returns `{timm_key: [source keys]}`."""
  out: dict[str, np.ndarray] = {}
  origin: dict[str, list[str]] = {}
  qkv: dict[tuple[str, str, str], dict[str, tuple[str, np.ndarray]]] = {}

  def put(new: str, value: np.ndarray, *sources: str) -> None:
    if new in out:  # two source keys for one parameter: keep the first, report the other
      new = 'duplicate.' + sources[0]
    out[new] = value
    origin[new] = list(sources)

  for key, value in state_dict.items():
    name = key[len(_HF_PREFIX):] if key.startswith(_HF_PREFIX) else key
    if name.startswith('embeddings.patch_embeddings.projection.'):
      put('patch_embed.proj.' + name.rsplit('.', 1)[1], value, key)
    elif name.startswith('embeddings.norm.'):
      put('patch_embed.norm.' + name.rsplit('.', 1)[1], value, key)
    elif name.startswith('layernorm.'):
      put('norm.' + name.rsplit('.', 1)[1], value, key)
    elif name.startswith('classifier.'):
      put('head.fc.' + name.rsplit('.', 1)[1], value, key)
    elif m := re.match(r'^encoder\.layers\.(\d+)\.downsample\.(.+)$', name):
      put(f'layers.{int(m[1]) + 1}.downsample.{m[2]}', value, key)
    elif m := re.match(r'^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$', name):
      prefix, rest = f'layers.{m[1]}.blocks.{m[2]}.', m[3]
      for naming, subs in _HF_QKV.items():
        hit = next((i for i, s in enumerate(subs) if rest.startswith(s)), None)
        if hit is not None:
          qkv.setdefault((prefix, naming, rest[len(subs[hit]):]), {})['qkv'[hit]] = (key, value)
          break
      else:
        for old, new in _HF_BLOCK_RENAMES:
          if rest.startswith(old):
            put(prefix + new + rest[len(old):], value, key)
            break
        else:
          put(prefix + 'hf.' + rest, value, key)  # no Swin parameter: reported as unused
    else:
      put('hf.' + name, value, key)  # e.g. position_embeddings, mask_token: unused

  for (prefix, _, leaf), parts in qkv.items():
    sources = [parts[p][0] for p in 'qkv' if p in parts]
    if len(parts) == 3 and len({np.shape(parts[p][1]) for p in 'qkv'}) == 1:
      put(f'{prefix}attn.qkv.{leaf}',
          np.concatenate([np.asarray(parts[p][1]) for p in 'qkv'], axis=0), *sources)
    else:  # incomplete or inconsistent q/k/v: keep them unused, `attn/qkv` will be missing
      for p, (src, value) in parts.items():
        put(f'{prefix}hf.{p}.{leaf}', value, src)
  return out, origin


def _from_timm(state_dict: Mapping[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
  """Old or current timm keys -> current timm keys; also returns `{new: [source keys]}`."""
  old_stages = 'layers.0.downsample.reduction.weight' in state_dict
  out: dict[str, np.ndarray] = {}
  origin: dict[str, list[str]] = {}
  for key, value in state_dict.items():
    new = key
    if old_stages:
      new = re.sub(r'^layers\.(\d+)\.downsample\.',
                   lambda m: f'layers.{int(m[1]) + 1}.downsample.', new)
    if new.startswith('head.') and not new.startswith('head.fc.'):
      new = 'head.fc.' + new[len('head.'):]
    if new in out:  # two source keys for one parameter: keep the first, report the other
      new = 'duplicate.' + key
    out[new] = value
    origin[new] = [key]
  return out, origin


def _flax_entry(key: str, value: np.ndarray) -> tuple[str, np.ndarray] | None:
  """One current-timm key -> `('params/...', array)`, or None if it is not a parameter."""
  parts = key.split('.')
  leaf, path = parts[-1], parts[:-1]
  module = '.'.join(path)
  if not _MODULE.match(module) or leaf not in ('weight', 'bias', 'relative_position_bias_table'):
    return None
  if (leaf == 'relative_position_bias_table') != module.endswith('.attn'):
    return None
  flax_path: list[str] = []
  i = 0
  while i < len(path):
    if path[i] in ('layers', 'blocks') and i + 1 < len(path) and path[i + 1].isdigit():
      flax_path.append(f'{path[i]}_{path[i + 1]}')
      i += 2
    else:
      flax_path.append(path[i])
      i += 1
  if leaf == 'relative_position_bias_table':
    return '/'.join(['params', *flax_path, leaf]), value
  if module == 'head.fc':
    flax_path = ['head']
  value = np.asarray(value)
  if path[-1] in _NORMS:
    name = 'scale' if leaf == 'weight' else 'bias'
  elif leaf == 'bias':
    name = 'bias'
  elif module == 'patch_embed.proj':
    name = 'kernel'
    if value.ndim == 4:  # OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
  else:
    name = 'kernel'
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
      value = value.T
  return '/'.join(['params', *flax_path, name]), value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], module: nn.Module
                       ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps a Swin state dict (any accepted layout) onto flat `'params/...'` Flax keys.

  Args:
    state_dict: `{torch_key: array}`.
    module: the target `SwinTransformer` (its shapes are checked by the caller).

  Returns:
    `(flat_variables, unused_keys)`: `unused_keys` are the source keys that map to no
    parameter (buffers such as `attn_mask`, or keys this model does not have).
  """
  del module  # the key map does not depend on the configuration
  hf = any(k.startswith(_HF_PREFIX) or k.startswith('encoder.layers.') for k in state_dict)
  renamed, origin = (_from_hf if hf else _from_timm)(state_dict)
  flat: dict[str, np.ndarray] = {}
  unused: list[str] = []
  for key, value in renamed.items():
    entry = _flax_entry(key, value)
    if entry is None:
      unused.extend(origin[key])
    else:
      flat[entry[0]] = entry[1]
  return flat, unused
