"""The tf.data input pipeline: train and eval iterators of NumPy batches for a JAX trainer.

    data = make_datasets(config.data, image_size=224, teacher_image_size=384,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         seed=config.seed)
    data.labels, data.num_train, data.steps_per_epoch          # metadata
    train = data.train(start_step=step)                        # resume exactly at `step`
    batch = next(train)          # {'image': (b, 224, 224, 3), 'teacher_image': (b, 384, ...),
                                 #  'label': (b,)} with b = batch_size / process_count
    for batch in data.eval():    # every example once; 'mask' (b,) is 0 on padding rows
      ...
    train.corrupt.count, train.corrupt.keys                    # corrupt images met so far

Batches are dicts of NumPy arrays (docs/contracts.md): `image` `(b, S, S, 3)` float32 in
[0, 1] at the student's size S; `label` `(b,)` int32; `teacher_image` `(b, T, T, 3)` when the
teacher's size T differs from S (the same crop as `image`); train batches with mixup/CutMix
also carry `soft_label` `(b, K)` float32 (rows sum to 1; `label` stays the row's own class);
eval batches carry `mask` `(b,)` float32, 0 for rows that are padding (or corrupt images).

Determinism: the train stream is a pure function of (seed, step) (`kdflax.data.plan`; the
seed is the run's `config.seed`, passed to `make_datasets`): an
iterator started at `start_step=s` yields bit for bit what an uninterrupted one yields from s
on, and reads only the images of the batches it yields. Process i of P gets rows
`[i*b, (i+1)*b)` of each global batch, so P processes together see exactly the global batches
of one process.

Corrupt images (`on_corrupt='skip'`): a record that fails to read or decode is replaced by the
next record of the epoch's order (train) or becomes a masked zero row (eval); the iterator
counts it in `iterator.corrupt` and logs each file once. As the replacement is fixed by the
schedule, the stream stays deterministic. `on_corrupt='error'` raises `CorruptImageError`
naming the file. Throughput: `kdflax.data.bench.measure_throughput(data.train(), ...)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np
import tensorflow as tf

from kdflax.data import transforms
from kdflax.data.config import check_data_config
from kdflax.data.image_table import ImageTable
from kdflax.data.iterators import Batch, CorruptImageError, EvalIterator, TrainIterator
from kdflax.data.plan import MixOptions, TrainPlan, eval_indices, view_seeds
from kdflax.data.records import Records
from kdflax.data.sanity import check_splits
from kdflax.data.sources import FolderSource, TfdsSource

log = logging.getLogger(__name__)
__all__ = ['CorruptImageError', 'Datasets', 'ImageTable', 'make_datasets', 'source_from_config']


def hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators (their memory is JAX's); a no-op once TF started."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass


def _options(threads: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def _cycle_length(threads: int) -> int:
  return max(4, 2 * (threads or os.cpu_count() or 1))


def _zeros(sizes: Mapping[str, int]) -> dict[str, tf.Tensor]:
  return {k: tf.zeros([s, s, 3], tf.float32) for k, s in sizes.items()}


def train_dataset(table: ImageTable, plan: TrainPlan, start_step: int, views,
                  sizes: Mapping[str, int], num_classes: int, threads: int = 0,
                  prefetch: int = 2) -> tf.data.Dataset:
  """Infinite dataset of process-local train batches from `start_step` on.

  Args:
    table: the train split.
    plan: its schedule (batch size, seed, shards, retries, mixing).
    start_step: first step yielded.
    views: `fn(image uint8, seed) -> {key: (S, S, 3) float32}` (e.g. `transforms.train_views`).
    sizes: the keys and sizes S of the views.
    num_classes: K, for `soft_label`.

  Elements are dicts of tensors with leading dimension `plan.local_batch`, plus `_skipped`
  `(b,)` int32: how many candidates of each row failed before one decoded (`1 + retries` when
  all failed). With cached views (`plan.views` > 0) each candidate is augmented with its own
  view's seed and elements also carry `index` `(b,)` int64 (the record shown) and `view`
  `(b,)` int32 (which of its views), for the teacher-cache lookup.
  """
  first = plan.step(start_step)
  signature = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in first.items()}
  cached = 'candidate_views' in first

  def steps():
    step = start_step
    while True:
      yield plan.step(step)
      step += 1

  per_candidate = ('candidates', 'seed', 'candidate_views', 'candidate_seeds')
  extra = [k for k in first if k not in per_candidate]
  num_candidates = first['candidates'].shape[1]

  def row(r):
    def attempt(j, index, seed, view):
      out = views(table.image(index), seed)
      out.update(label=table.label(index), _skipped=j)
      if cached:
        out.update(index=index, view=view)
      return out

    if cached:
      seeds, candidate_views = r['candidate_seeds'], r['candidate_views']
    else:  # every candidate of a slot takes the slot's seed
      seeds = tf.repeat(r['seed'][None], num_candidates, axis=0)
      candidate_views = tf.zeros([num_candidates], tf.int32)
    tries = tf.data.Dataset.from_tensor_slices(
        (tf.range(num_candidates, dtype=tf.int32), r['candidates'], seeds, candidate_views))
    good = tries.map(attempt).ignore_errors()
    failed = {**_zeros(sizes), 'label': tf.constant(0, tf.int32),
              '_skipped': tf.constant(num_candidates, tf.int32)}
    if cached:
      failed.update(index=tf.constant(-1, tf.int64), view=tf.constant(0, tf.int32))
    fallback = tf.data.Dataset.from_tensors(failed)
    both = good.concatenate(fallback).take(1)
    return both.map(lambda e: {**e, **{k: r[k] for k in extra}})

  ds = tf.data.Dataset.from_generator(steps, output_signature=signature).unbatch()
  ds = ds.interleave(row, cycle_length=_cycle_length(threads),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(plan.local_batch, drop_remainder=True)
  if plan.mix:
    def mix(batch):
      mixed = transforms.mix_batch(batch, list(sizes), num_classes, batch['partner'],
                                   batch['mode'], batch['lam'], batch['box'])
      return {k: v for k, v in mixed.items() if k not in extra}
    ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(prefetch or tf.data.AUTOTUNE)
  return ds.with_options(_options(threads))


def fixed_views_dataset(table: ImageTable, indices: np.ndarray, view_ids: np.ndarray,
                        seeds: np.ndarray, views, sizes: Mapping[str, int], threads: int = 0,
                        prefetch: int = 2) -> tf.data.Dataset:
  """Finite dataset of given augmented views of given records (building a teacher cache).

  Args:
    table: the split.
    indices: `(steps, b)` int64 rows, -1 for padding.
    view_ids: `(steps, b)` int32 view numbers (passed through).
    seeds: `(steps, b, 2)` int64 augmentation seeds (`plan.view_seeds`).
    views: `fn(image uint8, seed) -> {key: (S, S, 3) float32}`: the train transform.
    sizes: the keys and sizes S of the views.

  Elements: the views, `index` `(b,)` int64, `view` `(b,)` int32 and `mask` `(b,)` float32
  (0: padding or an image that cannot be read, whose views are zeros).
  """
  def row(index, view, seed):
    def load(i):
      out = views(table.image(i), seed)
      out.update(index=i, view=view, mask=tf.constant(1.0))
      return out

    good = tf.data.Dataset.from_tensors(index).filter(lambda i: i >= 0).map(load)
    pad = tf.data.Dataset.from_tensors(
        {**_zeros(sizes), 'index': index, 'view': view, 'mask': tf.constant(0.0)})
    return good.ignore_errors().concatenate(pad).take(1)

  steps, b = indices.shape
  ds = tf.data.Dataset.from_tensor_slices((indices.reshape(-1), view_ids.reshape(-1),
                                           seeds.reshape(-1, 2)))
  ds = ds.interleave(row, cycle_length=_cycle_length(threads),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(b, drop_remainder=True).prefetch(prefetch or tf.data.AUTOTUNE)
  ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
  return ds.with_options(_options(threads))


def eval_dataset(table: ImageTable, indices: np.ndarray, views, sizes: Mapping[str, int],
                 threads: int = 0, prefetch: int = 2) -> tf.data.Dataset:
  """Finite dataset of process-local eval batches.

  Args:
    table: the eval split.
    indices: `(steps, b)` int64 rows to read, -1 for padding (`plan.eval_indices`).
    views: `fn(image uint8) -> {key: (S, S, 3) float32}` (e.g. `transforms.eval_views`).
    sizes: the keys and sizes S of the views.

  Elements: the views, `label` `(b,)` int32, `mask` `(b,)` float32 (0: padding or corrupt) and
  `_skipped` `(b,)` int32 (1 where the image failed to decode).
  """
  def row(index):
    def load(i):
      out = views(table.image(i))
      out.update(label=table.label(i), mask=tf.constant(1.0), _skipped=tf.constant(0))
      return out

    good = tf.data.Dataset.from_tensors(index).filter(lambda i: i >= 0).map(load)
    pad = tf.data.Dataset.from_tensors(
        {**_zeros(sizes), 'label': tf.constant(0, tf.int32), 'mask': tf.constant(0.0),
         '_skipped': tf.cast(index >= 0, tf.int32)})
    return good.ignore_errors().concatenate(pad).take(1)

  steps, b = indices.shape
  ds = tf.data.Dataset.from_tensor_slices(indices.reshape(-1))
  ds = ds.interleave(row, cycle_length=_cycle_length(threads),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(b, drop_remainder=True).prefetch(prefetch or tf.data.AUTOTUNE)
  ds = ds.apply(tf.data.experimental.assert_cardinality(steps))
  return ds.with_options(_options(threads))


# ---------------------------------------------------------------------------- entry point


def source_from_config(config: ml_collections.ConfigDict) -> FolderSource | TfdsSource:
  """The source `config.data` names (`source`, `root` / `name`, `data_dir`, ...)."""
  if config.source == 'folder':
    return FolderSource(config.root, class_split=config.train_split)
  return TfdsSource(config.name, data_dir=config.data_dir, class_prefix=config.class_prefix,
                    hash_split=config.hash_split, hash_fractions=tuple(config.hash_fractions))


class Datasets:
  """Train / eval iterables and metadata of one process (built by `make_datasets`).

  Attributes:
    labels: class names; label id = position.
    num_classes: K.
    num_train, num_eval: examples in the train / eval split (0 when there is no eval split).
    batch_size, eval_batch_size: global batch sizes; local_batch_size, local_eval_batch_size:
      this process's share (`/ process_count`).
    steps_per_epoch: `num_train // batch_size` (the remainder is dropped each epoch).
    eval_steps: `ceil(num_eval / eval_batch_size)`.
    sizes: batch key -> square resolution (`'image'`, and `'teacher_image'` when it differs).
    soft_labels: whether train batches carry `soft_label` (mixup / CutMix on).
    cache_views: K > 0: train batches show one of K fixed views per image and carry `index`
      and `view` (training from a teacher cache, `kdflax.train.teacher_cache`).
    seed: the seed of the train stream and of the fixed views (the run's `config.seed`).
  """

  def __init__(self, config: ml_collections.ConfigDict, source, sizes: Mapping[str, int],
               process_index: int, process_count: int, cache_views: int = 0, seed: int = 0):
    self.config = config
    self.seed = int(seed)
    self.source = source
    self.sizes = dict(sizes)
    self.process_index, self.process_count = process_index, process_count
    self.labels: tuple[str, ...] = tuple(source.labels)
    self.num_classes = len(self.labels)
    self._train_records = source.records(config.train_split)
    self._eval_records = source.records(config.eval_split) if config.eval_split else None
    self.num_train = len(self._train_records)
    self.num_eval = len(self._eval_records) if self._eval_records is not None else 0
    where = config.root if config.source == 'folder' else f'tfds:{config.name}'
    for message in check_splits(self.labels, self._train_records, self._eval_records, where,
                                check_overlap=process_index == 0):
      log.warning('kdflax.data: %s', message)
    self.batch_size = config.batch_size
    self.eval_batch_size = config.eval_batch_size or config.batch_size
    mix = MixOptions(config.mixup_alpha, config.cutmix_alpha, config.mix_prob,
                     config.mix_switch_prob)
    retries = config.corrupt_retries if config.on_corrupt == 'skip' else 0
    self.cache_views = int(cache_views)
    self.plan = TrainPlan(self.num_train, self.batch_size, self.seed, process_index,
                          process_count, retries=retries, mix=mix, views=self.cache_views)
    self.local_batch_size = self.plan.local_batch
    self.steps_per_epoch = self.plan.steps_per_epoch
    self.soft_labels = self.plan.mix is not None
    self._eval_indices = None
    if self._eval_records is not None:
      self._eval_indices = eval_indices(self.num_eval, self.eval_batch_size, process_index,
                                        process_count)
    self.local_eval_batch_size = self.eval_batch_size // process_count
    self.eval_steps = 0 if self._eval_indices is None else len(self._eval_indices)
    self._tables: dict[str, ImageTable] = {}
    self._eval_dataset: tf.data.Dataset | None = None

  def _table(self, which: str) -> ImageTable:
    if which not in self._tables:
      records = self._train_records if which == 'train' else self._eval_records
      self._tables[which] = ImageTable(records, cache=self.config.cache)
    return self._tables[which]

  @property
  def train_records(self) -> Records:
    """The train split's table (row i is record index i of the schedules)."""
    return self._train_records

  def _train_views(self, sizes: Mapping[str, int] | None = None):
    c = self.config
    sizes = self.sizes if sizes is None else dict(sizes)
    if not c.augment:
      return lambda image, seed: transforms.eval_views(image, sizes, c.eval_crop_fraction)
    return lambda image, seed: transforms.train_views(
        image, seed, sizes, scale=tuple(c.crop_scale), ratio=tuple(c.crop_ratio),
        flip=c.flip, randaugment_ops=c.randaugment_ops,
        randaugment_magnitude=c.randaugment_magnitude)

  def train_dataset(self, start_step: int = 0) -> tf.data.Dataset:
    """The raw tf.data pipeline behind `train()` (elements also carry `_skipped`)."""
    return train_dataset(self._table('train'), self.plan, start_step, self._train_views(),
                         self.sizes, self.num_classes, self.config.threads,
                         self.config.prefetch)

  def train(self, start_step: int = 0) -> TrainIterator:
    """Process-local train batches from global step `start_step` on, forever."""
    return TrainIterator(self.train_dataset(start_step), self.plan, self._table('train'),
                         start_step, self.config.on_corrupt)

  def fixed_views(self, num_views: int, batch_size: int, sizes: Mapping[str, int]
                  ) -> tuple[int, Iterator[Batch]]:
    """Views `0..num_views-1` of every train record, record-major, in batches.

    View v of record i is the train transform (crop, flip, RandAugment: `_train_views`) with
    seed `plan.view_seeds(seed, i, v)`, at the resolutions `sizes`: exactly the crop a
    `cache_views=num_views` train stream shows when it picks view v of record i.

    Returns:
      `(steps, iterator)`; batches carry the views, `index`, `view` and `mask` (0: padding or
      unreadable image) and have `batch_size` rows (the last one padded).
    """
    total = self.num_train * num_views
    steps = max(1, -(-total // batch_size))
    flat = np.arange(steps * batch_size, dtype=np.int64)
    index = np.where(flat < total, flat // num_views, -1)
    view = (flat % num_views).astype(np.int32)
    seeds = view_seeds(self.seed, np.maximum(index, 0), view)
    shape = (steps, batch_size)
    ds = fixed_views_dataset(self._table('train'), index.reshape(shape), view.reshape(shape),
                             seeds.reshape(*shape, 2), self._train_views(sizes), sizes,
                             self.config.threads, self.config.prefetch)
    return steps, ds.as_numpy_iterator()

  def eval(self) -> EvalIterator:
    """One pass over the eval split: every example once, padded rows masked."""
    if self._eval_indices is None:
      raise ValueError('no eval split: config.data.eval_split is empty')
    c = self.config
    if self._eval_dataset is None:  # built (traced) once, iterated afresh by every call
      views = lambda image: transforms.eval_views(image, self.sizes, c.eval_crop_fraction)
      self._eval_dataset = eval_dataset(self._table('eval'), self._eval_indices, views,
                                        self.sizes, c.threads, c.prefetch)
    return EvalIterator(self._eval_dataset, self._eval_indices, self._table('eval'),
                        c.on_corrupt)


def make_datasets(config: ml_collections.ConfigDict, image_size: int | None = None,
                  teacher_image_size: int | None = None, process_index: int = 0,
                  process_count: int = 1, cache_views: int = 0, seed: int = 0) -> Datasets:
  """Builds this process's train / eval iterables from a `config.data` section.

  Args:
    config: `default_data_config()` with overrides.
    image_size: the student's resolution, used when `config.image_size` is None.
    teacher_image_size: the teacher's resolution, used when `config.teacher_image_size` is
      None; batches carry `teacher_image` only when it differs from the student's.
    process_index, process_count: this process among those reading the data
      (`jax.process_index()`, `jax.process_count()`); batch sizes are global.
    cache_views: K > 0: the train stream shows one of K fixed views per image and yields
      `index` and `view` (training from a teacher cache); excludes mixup/CutMix.
    seed: non-negative int, the run's `config.seed`: the train stream (order, crops, flips,
      RandAugment, mixing, substitutes for corrupt images) is a pure function of (seed, step).

  Returns:
    `Datasets`: `.train(start_step)`, `.eval()`, `.labels`, `.num_train`, `.steps_per_epoch`...
  """
  check_data_config(config)
  student = config.image_size or image_size
  if not student:
    raise ValueError('no image size: set config.data.image_size or pass image_size')
  teacher = config.teacher_image_size or teacher_image_size
  sizes = {'image': int(student)}
  if teacher and int(teacher) != int(student):
    sizes['teacher_image'] = int(teacher)
  hide_gpus_from_tensorflow()
  return Datasets(config, source_from_config(config), sizes, process_index, process_count,
                  cache_views=cache_views, seed=seed)
