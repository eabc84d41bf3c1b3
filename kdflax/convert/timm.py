"""timm / Hugging Face PyTorch checkpoints -> Flax variables.

    variables = load_timm_checkpoint('swin_tiny_patch4_window7_224', 'model.safetensors')
    module, size = create_model('swin_tiny_patch4_window7_224', num_classes=...)
    logits = module.apply(variables, images)       # images (B, size, size, 3) in [0, 1]

A checkpoint is `.safetensors` or a `torch.save` file (`.pth`/`.pt`/`.bin`/`.ckpt`, zip or legacy
format), both read with NumPy alone: no PyTorch needed. `torch.save` files go through
`kdflax.convert.torch_pickle`, which never runs pickled code (any global outside its allow-list of
tensor, storage and container names is refused); floating-point tensors come back as float32,
as `tensor.float()` would give. Wrappers such as
`{'state_dict': ...}`, `{'model': ...}` and DataParallel `module.` prefixes are unwrapped.

The per-family key mapping lives in `kdflax/convert/{swin,mobilenetv3,vit,efficientnet_lite}.py`;
each exposes

    num_classes(state_dict) -> int | None
    convert_state_dict(state_dict, module) -> (flat_variables, unused_keys)

where `flat_variables` maps '/'-joined Flax paths that start with the collection
('params/...', 'batch_stats/...') to NumPy arrays. This file checks the result against the
module's own variable shapes and raises one `CheckpointError` that lists every missing,
unexpected and mis-shaped key: nothing is ever loaded partially.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from kdflax.convert import torch_pickle
from kdflax.models import registry
from kdflax.models.complexity import abstract_variables

# Buffers PyTorch keeps in a state dict that carry no learned value.
IGNORED_SUFFIXES = ('num_batches_tracked', 'relative_position_index', 'attn_mask')
_WRAPPER_KEYS = ('state_dict', 'model', 'model_state', 'module', 'state_dict_ema', 'model_ema')
_MAX_LISTED = 20
_FAMILIES = ('swin', 'mobilenetv3', 'vit', 'efficientnet_lite')


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the requested model."""


def _read_torch(path: str) -> Any:
  """A `torch.save` file as NumPy (no PyTorch), floating-point arrays as float32."""
  try:
    obj = torch_pickle.read_checkpoint(path)
  except ValueError as e:  # TorchPickleError: one line naming the file
    raise CheckpointError(str(e)) from None

  def to_float32(value: Any) -> Any:
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
      return value.astype(np.float32, copy=False)
    if isinstance(value, dict):  # in place: keeps an OrderedDict's type and order
      for key in list(value):
        value[key] = to_float32(value[key])
    return value

  return to_float32(obj)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into `{torch_key: float32/int NumPy array}`.

  Raises:
    CheckpointError: missing file, unknown format, or a file that is not a checkpoint.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such checkpoint file')
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      raw: Mapping[str, Any] = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f'{path}: not a readable .safetensors file ({e})') from None
  elif path.endswith(('.pth', '.pt', '.bin', '.ckpt')) or zipfile.is_zipfile(path):
    raw = _read_torch(path)
  else:
    raise CheckpointError(
        f'{path}: unknown checkpoint format; expected .safetensors, .pth, .pt or .bin')

  for _ in range(3):  # unwrap {'state_dict': {...}} style containers
    if isinstance(raw, Mapping):
      inner = next((raw[k] for k in _WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
      if inner is not None:
        raw = inner
  if not isinstance(raw, Mapping) or not raw:
    raise CheckpointError(f'{path}: expected a state dict of named tensors, '
                          f'got {type(raw).__name__}')

  out: dict[str, np.ndarray] = {}
  for key, value in raw.items():
    if not hasattr(value, 'shape'):
      raise CheckpointError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor; '
                            'expected a state dict of named tensors')
    if hasattr(value, 'detach'):  # torch.Tensor
      value = value.detach().cpu()
      if value.is_floating_point():
        value = value.float()
      value = value.numpy()
    key = key[len('module.'):] if key.startswith('module.') else key
    out[key] = np.asarray(value)
  return out


def _family_converter(family: str):
  return importlib.import_module(f'kdflax.convert.{family}')


def _listing(title: str, items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f' ... and {len(items) - len(shown)} more' if len(items) > len(shown) else ''
  return f'{title} ({len(items)}): {", ".join(shown)}{more}'


def infer_num_classes(name: str, state_dict: Mapping[str, np.ndarray],
                      source: str = '<state dict>') -> int:
  """Head size stored in a checkpoint for model `name`.

  Raises:
    CheckpointError: the state dict is not of `name`'s family (naming the family it looks
      like, when it is one of ours).
  """
  family = registry.model_family(name)
  found = _family_converter(family).num_classes(state_dict)
  if found is None:
    families = [f for f in _FAMILIES
                if f != family and _family_converter(f).num_classes(state_dict) is not None]
    hint = f'; it looks like a {families[0]} checkpoint' if families else ''
    raise CheckpointError(
        f'{source}: no {family} classifier weights found for model {name!r}{hint} '
        f'(first keys: {", ".join(list(state_dict)[:5])})')
  return int(found)


def convert_state_dict(name: str, state_dict: Mapping[str, np.ndarray],
                       num_classes: int | None = None, source: str = '<state dict>',
                       **overrides: Any) -> dict[str, Any]:
  """Converts an in-memory PyTorch state dict for model `name` into Flax variables.

  Args:
    name: registered model name (see `kdflax.models.MODELS`).
    state_dict: `{torch_key: array}` as returned by `load_state_dict`.
    num_classes: head size; inferred from the checkpoint's classifier when None.
    source: the file name, for error messages.
    **overrides: passed to `create_model` (e.g. `depths` for a shallower test model).

  Returns:
    `{'params': ..., ['batch_stats': ...]}` of NumPy float32 arrays.

  Raises:
    CheckpointError: the checkpoint is of another family, or keys are missing, unexpected
      or of the wrong shape (all listed in one message).
  """
  if num_classes is None:
    num_classes = infer_num_classes(name, state_dict, source)
  else:
    infer_num_classes(name, state_dict, source)  # rejects checkpoints of another family
  converter = _family_converter(registry.model_family(name))
  module, image_size = registry.create_model(name, num_classes, **overrides)
  expected = {
      '/'.join(k): tuple(v.shape)
      for k, v in traverse_util.flatten_dict(abstract_variables(module, image_size)).items()}

  converted, unused = converter.convert_state_dict(state_dict, module)
  unexpected = sorted(k for k in unused if not k.endswith(IGNORED_SUFFIXES))
  missing = sorted(set(expected) - set(converted))
  extra = sorted(set(converted) - set(expected))
  wrong = sorted(f'{k} {tuple(np.shape(converted[k]))} != expected {expected[k]}'
                 for k in set(expected) & set(converted)
                 if tuple(np.shape(converted[k])) != expected[k])
  problems = []
  if missing:
    problems.append(_listing('missing', missing))
  if unexpected or extra:
    problems.append(_listing('unexpected', unexpected + [f'(flax) {k}' for k in extra]))
  if wrong:
    problems.append(_listing('wrong shape', wrong))
  if problems:
    raise CheckpointError(
        f'{source} does not fit {name} ({num_classes} classes): ' + '; '.join(problems))

  flat = {tuple(k.split('/')): np.asarray(v, dtype=np.float32) for k, v in converted.items()}
  return traverse_util.unflatten_dict(flat)


def load_timm_checkpoint(name: str, path: str | os.PathLike, num_classes: int | None = None,
                         **overrides: Any) -> dict[str, Any]:
  """Loads a timm (or HF transformers Swin) PyTorch checkpoint as Flax variables.

  Args:
    name: registered model name, e.g. `swin_large_patch4_window12_384`.
    path: `.safetensors`, `.pth`, `.pt` or `.bin` file.
    num_classes: expected head size; inferred from the checkpoint when None (a mismatch
      with the checkpoint is reported as a wrong-shape error).
    **overrides: passed to `create_model`.

  Returns:
    A dict with `params` (and `batch_stats` for BatchNorm models), ready for
    `module.apply(variables, images)` with `images` NHWC float32 in [0, 1].
  """
  state_dict = load_state_dict(path)
  variables = convert_state_dict(name, state_dict, num_classes, source=os.fspath(path),
                                 **overrides)
  return jax.tree.map(np.asarray, variables)
