"""Photos of a configured split as the uint8 arrays a served model takes (export, parity).

    source = source_from_config(config.data)       # one source: TFDS is read once
    images, labels, names = split_photos(source, 'validation', size=224, limit=500)

Works for every source `config.data` can name (image folders and TFDS, e.g. `plant_village`
filtered to its tomato classes): the split's rows are read through the same `Records` table
the training pipeline uses, decoded with PIL and cut to `kdflax.data.eval_view.eval_view`, so
export calibration, parity and accuracy see the pixels the trained model was evaluated on.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdflax.data.eval_view import CROP_FRACTION, eval_view
from kdflax.data.sources import FolderSource, TfdsSource

Source = FolderSource | TfdsSource


class ImageError(ValueError):
  """An image that cannot be read or decoded; the message names the file."""


def decode_photo(source: str | os.PathLike | bytes, name: str | None = None) -> np.ndarray:
  """Decodes a file path or encoded bytes (PIL) -> `(H, W, 3)` uint8 RGB.

  Alpha is dropped and grey expanded. `name` labels the image in errors (default: the path).

  Raises:
    ImageError: unreadable, truncated or corrupt image (one line naming it).
  """
  is_bytes = isinstance(source, bytes | bytearray)
  label = name or ('<encoded bytes>' if is_bytes else os.fspath(source))
  try:
    with Image.open(io.BytesIO(source) if is_bytes else source) as img:
      img.load()  # decode now: truncated JPEGs fail here, not later
      rgb = img.convert('RGB')
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    raise ImageError(f'{label}: cannot decode image ({e})') from None
  return np.asarray(rgb, dtype=np.uint8)


def spread(n: int, limit: int | None) -> np.ndarray:
  """`(M,)` sorted row indices: all of `range(n)`, or `limit` of them evenly spread.

  Spreading (rather than taking the first `limit`) keeps every class of a class-sorted table.
  """
  if limit is None or n <= limit:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, max(limit, 1)).round().astype(int))


def split_photos(source: Source, split: str, size: int, limit: int | None = None,
                 crop_fraction: float = CROP_FRACTION
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """Up to `limit` photos of `split`, evenly spread over its rows, as evaluation views.

  Args:
    source: the configured source (`kdflax.data.pipeline.source_from_config(config.data)`);
      pass the same one for several splits or sizes (it keeps the records it has read).
    split: a split of that source (e.g. `config.data.train_split`).
    size: side S of the views.
    limit: at most this many photos (None: all).
    crop_fraction: the evaluation crop (`config.data.eval_crop_fraction`).

  Returns:
    `(images (M, S, S, 3) uint8, labels (M,) int32, class names)`; undecodable photos are
    skipped with a warning on stderr.

  Raises:
    ValueError: the split has no decodable photo.
  """
  records = source.records(split)
  rows = records.select(spread(len(records), limit))
  blobs = rows.encoded if rows.encoded is not None else rows.paths
  images, labels = [], []
  for key, label, blob in zip(rows.keys, rows.labels, blobs, strict=True):
    try:
      images.append(eval_view(decode_photo(blob, str(key)), size, crop_fraction))
      labels.append(int(label))
    except ImageError as e:
      print(f'warning: skipping {e}', file=sys.stderr)
  if not images:
    raise ValueError(f'split {split!r} of {describe_source(source)}: no decodable photos')
  return np.stack(images), np.asarray(labels, np.int32), tuple(source.labels)


def describe_source(source: Source) -> str:
  """A short name of a source: its folder, or e.g. `tfds:plant_village`."""
  return source.root if isinstance(source, FolderSource) else f'tfds:{source.name}'


def save_split_photos(source: Source, split: str, folder: str, limit: int | None = None
                      ) -> list[str]:
  """Writes up to `limit` original photos of `split` to `folder/<class>/` (spread over it).

  Image-folder sources are copied as they are; TFDS images are written as their stored
  encoded bytes (JPEG/PNG), named after their key. The result is a labelled folder that
  `kdflax predict`, `kdflax export --eval` and an app's test set can read. Returns the paths.
  """
  import shutil

  records = source.records(split)
  rows = records.select(spread(len(records), limit))
  written = []
  for i, (key, label) in enumerate(zip(rows.keys, rows.labels, strict=True)):
    class_dir = os.path.join(folder, source.labels[int(label)])
    os.makedirs(class_dir, exist_ok=True)
    if rows.paths is not None:
      path = os.path.join(class_dir, os.path.basename(str(rows.paths[i])))
      shutil.copyfile(rows.paths[i], path)
    else:
      blob = bytes(rows.encoded[i])
      ext = '.png' if blob.startswith(b'\x89PNG') else '.jpg'
      stem = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(key)) or f'photo{i}'
      path = os.path.join(class_dir, os.path.splitext(stem)[0] + ext)
      with open(path, 'wb') as f:
        f.write(blob)
    written.append(path)
  return written


def to_model_labels(idx: np.ndarray, classes: tuple[str, ...], labels: tuple[str, ...],
                    where: str) -> np.ndarray:
  """Class indices of `classes` -> indices of the model's `labels` (unchanged without labels)."""
  if not labels:
    return np.asarray(idx, np.int32)
  missing = [c for c in classes if c not in labels]
  if missing:
    raise ValueError(f'{where}: classes {missing} are not among the model labels {list(labels)}')
  return np.asarray([labels.index(classes[i]) for i in idx], np.int32)
