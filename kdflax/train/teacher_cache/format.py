"""The cache directory's format: file names, the format version, the one error type.

    DIR/manifest.json                      written last: its presence marks a complete cache
    DIR/logits.00000.npy ...               (n, K, classes) float32, n <= shard_images records
    DIR/attention.<pair>.00000.npy ...     (n, K, *target_shape) float32
    DIR/manifold.<pair>.00000.npy ...
    DIR.partial-<pid>/                     a build in progress (renamed to DIR at its end)
"""

from __future__ import annotations

import glob
import os

import ml_collections

FORMAT = 1
MANIFEST = 'manifest.json'
PARTIAL = '.partial-'
LOGITS = 'logits'
SHARD_BYTES = 256 * 2**20


class CacheError(ValueError):
  """A teacher cache cannot be built or used (the message is one line)."""


def refuse_mixing(config: ml_collections.ConfigDict) -> None:
  """CacheError when mixup or CutMix is on: a mixed image's teacher output is not cached."""
  data = config.data
  if float(data.mixup_alpha) > 0 or float(data.cutmix_alpha) > 0:
    raise CacheError(f'teacher cache: config.data.mixup_alpha={data.mixup_alpha} / '
                     f'cutmix_alpha={data.cutmix_alpha} mix two images, whose teacher outputs a '
                     'cache cannot hold; set both to 0, or distill with the live teacher')


def shard_path(directory: str, name: str, shard: int) -> str:
  """The `.npy` file of shard `shard` of array `name` (`'logits'` or `'<term>/<pair>'`)."""
  return os.path.join(directory, f'{name.replace("/", ".")}.{shard:05d}.npy')


def partial_builds(directory: str) -> list[str]:
  """The `DIR.partial-*` directories of builds of `directory` in progress or interrupted."""
  return glob.glob(glob.escape(directory) + PARTIAL + '*')
