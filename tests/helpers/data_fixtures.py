"""Small image datasets for the `kdflax.data` tests: real photo copies, coloured PNGs, fake TFDS."""

from __future__ import annotations

import io
import os
import pathlib
import shutil

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
BEANS_SAMPLE = ROOT / 'data' / 'beans_sample'


def copy_beans(dest: pathlib.Path, per_class: dict[str, int]) -> pathlib.Path:
  """Copies the first `per_class[split]` real photos of each class into `dest/<split>/<class>`."""
  for split, count in per_class.items():
    for class_dir in sorted((BEANS_SAMPLE / split).iterdir()):
      out = dest / split / class_dir.name
      out.mkdir(parents=True, exist_ok=True)
      for f in sorted(class_dir.glob('*.jpg'))[:count]:
        shutil.copyfile(f, out / f.name)
  return dest


def colour_of(i: int) -> tuple[int, int, int]:
  """A distinct, exactly recoverable RGB colour per index i < 216."""
  return (40 * (i % 6) + 20, 40 * ((i // 6) % 6) + 20, 40 * (i // 36) + 20)


def index_of(pixel: np.ndarray) -> int:
  """Inverse of `colour_of` for a float [0, 1] or uint8 pixel."""
  rgb = np.asarray(pixel, np.float64) * (255.0 if np.max(pixel) <= 1.0 else 1.0)
  r, g, b = (int(round((v - 20) / 40)) for v in rgb)
  return r + 6 * g + 36 * b


def write_colour_folder(dest: pathlib.Path, split: str, counts: dict[str, int],
                        start: int = 0) -> list[tuple[str, int]]:
  """Solid-colour PNGs (various sizes) under `dest/split/<class>/`; returns (class, index)."""
  made, i = [], start
  for name, count in counts.items():
    folder = dest / split / name
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(count):
      h, w = 20 + 3 * (i % 5), 24 + 2 * (i % 7)
      array = np.broadcast_to(np.array(colour_of(i), np.uint8), (h, w, 3))
      Image.fromarray(np.ascontiguousarray(array)).save(folder / f'img_{i:03d}.png')
      made.append((name, i))
      i += 1
  return made


def encode(array: np.ndarray, fmt: str = 'PNG') -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def truncate(path: os.PathLike, keep: float = 0.5) -> None:
  """Cuts a file to a fraction of its bytes (a truncated download)."""
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:int(len(data) * keep)])


def fake_tfds(examples_per_split: dict[str, list[dict]]):
  """An `as_dataset_fn` for `tfds.testing.mock_data` yielding exactly the given examples.

  Each example is `{'image': encoded bytes, 'label': int, ['image/filename': str]}`. Honours
  `SkipDecoding` of the image (else decodes it) and `read_config.add_tfds_id`.
  """
  import tensorflow as tf

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del kwargs
    examples = examples_per_split[str(split)]
    columns = {'image': [e['image'] for e in examples],
               'label': np.array([e['label'] for e in examples], np.int64)}
    if 'image/filename' in self.info.features:
      columns['image/filename'] = [e['image/filename'] for e in examples]
    ds = tf.data.Dataset.from_tensor_slices(columns)
    if not (decoders and 'image' in decoders):
      ds = ds.map(lambda e: {**e, 'image': tf.io.decode_image(e['image'], channels=3)})
    if read_config is not None and read_config.add_tfds_id:
      ids = tf.data.Dataset.range(len(examples)).map(
          lambda i: tf.strings.join([f'{self.name}-{split}.tfrecord__', tf.strings.as_string(i)]))
      ds = tf.data.Dataset.zip(ds, ids).map(lambda e, i: {**e, 'tfds_id': i})
    return ds

  return as_dataset
