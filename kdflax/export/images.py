"""Image files -> the uint8 arrays an exported model takes (calibration, parity, predict).

An exported model takes `(B, S, S, 3)` uint8 RGB in 0..255: the photo's evaluation view
(`kdflax.data.eval_view.eval_view`: the centre square box, sampled bilinearly to S x S as
MediaPipe's `ImageClassifier` does with that box as its region of interest), the same array
the training pipeline evaluates on. `load_image` decodes a file (PIL) and produces that
array; JAX references are computed from the same array.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from kdflax.data.eval_view import CROP_FRACTION, eval_view
from kdflax.data.photos import ImageError, decode_photo, spread

__all__ = ['CROP_FRACTION', 'ImageError', 'batches', 'decode_image', 'find_images',
           'labelled_folder', 'load_image', 'load_images', 'sample_images']
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def find_images(paths: Sequence[str | os.PathLike]) -> list[str]:
  """Image files named by `paths`: files as given, folders searched recursively (sorted).

  Raises:
    FileNotFoundError: a path that does not exist.
  """
  found: list[str] = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.')]
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise FileNotFoundError(f'{path}: no such file or directory')
  return found


def decode_image(path: str | os.PathLike) -> np.ndarray:
  """Decodes `path` fully (PIL) -> `(H, W, 3)` uint8 RGB (alpha dropped, grey expanded).

  Raises:
    ImageError: unreadable, truncated or corrupt file (one line naming the file).
  """
  return decode_photo(path)


def load_image(path: str | os.PathLike, size: int, crop_fraction: float = CROP_FRACTION
               ) -> np.ndarray:
  """Decodes `path` and returns the `(size, size, 3)` uint8 RGB view the model sees.

  `kdflax.data.eval_view.eval_view` of the decoded photo: the same pixels as the training
  pipeline's evaluation view (`kdflax.data.transforms.eval_views`) and as MediaPipe's
  `ImageClassifier` given the region of interest `kdflax.data.eval_view.eval_roi`.

  Raises:
    ImageError: unreadable, truncated or corrupt file (one line naming the file).
  """
  return eval_view(decode_image(path), size, crop_fraction)


def load_images(paths: Sequence[str | os.PathLike], size: int) -> np.ndarray:
  """`(N, size, size, 3)` uint8 stack of `paths`; raises `ImageError` on the first bad file."""
  if not paths:
    return np.zeros((0, size, size, 3), np.uint8)
  return np.stack([load_image(p, size) for p in paths])


def sample_images(root: str | os.PathLike, size: int, limit: int | None = None) -> np.ndarray:
  """Up to `limit` images found under `root`, evenly spread over the sorted file list.

  Spreading (rather than taking the first `limit`) keeps every class of a `root/<class>/`
  folder in a calibration set. Unreadable files are skipped.

  Raises:
    ValueError: `root` holds no readable image.
  """
  files = find_images([root])
  files = [files[i] for i in spread(len(files), limit)]
  arrays = []
  for f in files:
    try:
      arrays.append(load_image(f, size))
    except ImageError:
      continue
  if not arrays:
    raise ValueError(f'{os.fspath(root)}: no readable images '
                     f'(looked for {", ".join(IMAGE_EXTENSIONS)})')
  return np.stack(arrays)


def labelled_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """`root/<class>/**/image` -> `(files, labels (N,) int32, class_names)`, classes sorted.

  Raises:
    ValueError: `root` has no class sub-folders or no images.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise ValueError(f'{root}: expected a folder laid out as <class>/<image files>')
  classes = tuple(sorted(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d)) and not d.startswith('.')))
  files: list[str] = []
  labels: list[int] = []
  for i, name in enumerate(classes):
    these = find_images([os.path.join(root, name)])
    files += these
    labels += [i] * len(these)
  if not files:
    raise ValueError(f'{root}: no images in <class>/ sub-folders')
  return files, np.asarray(labels, np.int32), classes


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
  """Consecutive slices of `items` of at most `size` elements."""
  for start in range(0, len(items), size):
    yield items[start:start + size]
