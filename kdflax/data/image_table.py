"""`ImageTable`: one split's images inside tf.data, read and decoded by row index.

Rows that fail to read or decode are found when the table is built (`cache=True`, images
decoded once and kept) or when a row is read (streaming from files or bytes); the pipeline
substitutes or masks them (`kdflax.data.pipeline`).
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf

from kdflax.data import transforms
from kdflax.data.records import Records


class ImageTable:
  """Reads and decodes row `i` of a `Records` table inside tf.data.

  The table lives in TF resource variables (file paths, encoded bytes, or with `cache=True`
  the decoded pixels), so a pipeline captures a handle, not a copy. `image(i)` raises a TF
  error (which the pipeline catches) for an image that cannot be read or decoded.
  """

  def __init__(self, records: Records, cache: bool = False):
    self.records = records
    self.num_examples = len(records)
    self.labels = tf.Variable(records.labels.astype(np.int32), trainable=False)
    self._from_paths = records.paths is not None
    blobs = records.paths if self._from_paths else records.encoded
    self._blobs = tf.Variable(tf.constant(blobs, tf.string), trainable=False)
    self._raw = False
    if cache:
      self._cache_decoded()

  def _decode_row(self, index: tf.Tensor) -> tf.Tensor:
    blob = tf.gather(self._blobs, index)
    return transforms.decode(tf.io.read_file(blob) if self._from_paths else blob)

  def _cache_decoded(self) -> None:
    """Decodes every row once (in parallel) and keeps the pixels; failures are remembered."""
    def row(index):
      good = tf.data.Dataset.from_tensors(index).map(
          lambda i: (self._decode_row(i), True)).ignore_errors()
      bad = tf.data.Dataset.from_tensors((tf.zeros([0, 0, 3], tf.uint8), False))
      return good.concatenate(bad).take(1)

    ds = tf.data.Dataset.range(self.num_examples).interleave(
        row, cycle_length=max(4, os.cpu_count() or 1), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    raw, shapes, ok = [], [], []
    for image, good in ds.as_numpy_iterator():
      raw.append(image.tobytes())
      shapes.append(image.shape)
      ok.append(good)
    self._blobs = tf.Variable(tf.constant(np.array(raw, dtype=object), tf.string),
                              trainable=False)
    self._shapes = tf.Variable(np.array(shapes, np.int32).reshape(-1, 3), trainable=False)
    self._ok = tf.Variable(np.array(ok, bool), trainable=False)
    self._raw = True

  def image(self, index: tf.Tensor) -> tf.Tensor:
    """`(H, W, 3)` uint8 of row `index` (a scalar int64 tensor)."""
    if not self._raw:
      return self._decode_row(index)
    check = tf.debugging.Assert(tf.gather(self._ok, index), ['corrupt image at row', index])
    with tf.control_dependencies([check]):
      pixels = tf.io.decode_raw(tf.gather(self._blobs, index), tf.uint8)
    image = tf.reshape(pixels, tf.gather(self._shapes, index))
    image.set_shape([None, None, 3])
    return image

  def label(self, index: tf.Tensor) -> tf.Tensor:
    return tf.gather(self.labels, index)

  def diagnose(self, index: int) -> str:
    """Why row `index` fails, in one line (reads and decodes it eagerly, outside tf.data)."""
    try:
      if self._from_paths:
        with open(self.records.paths[index], 'rb') as f:
          data = f.read()
      else:
        data = self.records.encoded[index]
    except OSError as e:
      return f'unreadable ({e.strerror})'
    try:
      transforms.decode(tf.constant(data))
    except tf.errors.OpError as e:
      message = re.sub(r'\{\{[^}]*\}\}\s*', '', e.message).split('[Op:')[0]
      return message.strip().splitlines()[0] if message.strip() else type(e).__name__
    return 'decodes here; a later transform failed on it'


# ---------------------------------------------------------------------------- tf.data graphs
