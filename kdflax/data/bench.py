"""Input-pipeline throughput: how many images per second an iterator of batches delivers.

    data = make_datasets(config.data, image_size=224)
    print(measure_throughput(data.train(), num_batches=50))
    # {'batches': 50, 'images': 3200, 'seconds': 9.1, 'images_per_s': 351.6, ...}

Compare `images_per_s` with the trainer's images per second per process: the pipeline should
deliver comfortably more, or the accelerator waits for data.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import numpy as np


def measure_throughput(batches: Iterator[Mapping[str, np.ndarray]], num_batches: int = 50,
                       warmup: int = 3) -> dict[str, float]:
  """Pulls `warmup` batches (untimed: graph tracing, first decodes), then times `num_batches`.

  Args:
    batches: an iterator of batches (dicts whose `'image'` has the batch dimension first).
    num_batches: timed batches.
    warmup: untimed batches first.

  Returns:
    dict with `batches`, `images`, `seconds`, `images_per_s`, `batches_per_s`,
    `warmup_seconds`.
  """
  if num_batches < 1:
    raise ValueError(f'num_batches must be >= 1, got {num_batches}')
  start = time.perf_counter()
  for _ in range(warmup):
    next(batches)
  warm = time.perf_counter()
  images = 0
  for _ in range(num_batches):
    images += len(next(batches)['image'])
  seconds = time.perf_counter() - warm
  return {'batches': num_batches, 'images': images, 'seconds': seconds,
          'images_per_s': images / seconds, 'batches_per_s': num_batches / seconds,
          'warmup_seconds': warm - start}
