"""`config.data`: the data section of a kdflax config, its defaults and its checks.

    config.data = default_data_config()
    config.data.source = 'tfds'; config.data.name = 'plant_village'

Keys (None = "not set"; see `default_data_config` for the defaults):

  source            'folder' (image folders) or 'tfds'.
  root              folder source: `root/<split>/<class>/*.{jpg,jpeg,png}`.
  name              tfds source: TFDS name, e.g. 'plant_village' (10 tomato classes, hash split
                    train/validation/test), 'beans' (splits train/validation/test), any other
                    dataset with `image` + ClassLabel `label` features.
  data_dir          tfds source: TFDS data directory (None: TFDS's default). Never downloads.
  class_prefix      tfds: keep classes whose name starts with this, relabelled 0..K-1 in TFDS's
                    label order (None: dataset default, 'Tomato___' for plant_village; '' keeps
                    all).
  hash_split        tfds: split `train` into train/validation/test by hashing file names
                    (None: dataset default, True for plant_village).
  hash_fractions    tfds: fractions of train/validation/test for hash_split.
  train_split       split to train on.
  eval_split        split to evaluate on ('' for none): 'val' for the bundled folders,
                    'validation' for TFDS beans / plant_village.
  image_size        student resolution (None: the caller's, i.e. the student model's).
  teacher_image_size  teacher resolution (None: the caller's); batches carry `teacher_image`
                    only when it differs from image_size.
  batch_size        GLOBAL train batch (over all processes); each process gets
                    batch_size / process_count rows.
  eval_batch_size   GLOBAL eval batch (None: batch_size).
  augment           False: train batches use the eval transform (still shuffled).
  crop_scale        random-resized-crop area fraction range.
  crop_ratio        random-resized-crop aspect-ratio (w/h) range.
  flip              random horizontal flip.
  randaugment_ops   RandAugment N (0: off).
  randaugment_magnitude  RandAugment M in [0, 10].
  mixup_alpha       mixup Beta(a, a) (0: off). With mixup or CutMix on, train batches carry
                    `soft_label` (B, K) float32 besides the integer `label`.
  cutmix_alpha      CutMix Beta(a, a) (0: off).
  mix_prob          probability that a pair of rows is mixed.
  mix_switch_prob   probability of CutMix rather than mixup when both are on.
  eval_crop_fraction  eval: resize the short side to floor(size / fraction), centre-crop size.
  on_corrupt        'skip': a corrupt/truncated image is replaced by the next record of the
                    epoch's order, counted and reported (iterator.corrupt); in eval it becomes
                    a masked row. 'error': raise, naming the file.
  corrupt_retries   'skip': how many following records to try before giving up.
  cache             keep the DECODED images of a split in memory (small datasets: decode once).
  threads           tf.data thread pool size (0: TensorFlow's default, all cores).
  prefetch          batches prepared ahead of the consumer (0: tf.data AUTOTUNE).

The seed of the train stream (order, augmentation, mixing, substitutes) is not a key here: it
is the run's `config.seed`, given to `make_datasets(..., seed=)`; the stream is a pure
function of (seed, step).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SOURCES = ('folder', 'tfds')
ON_CORRUPT = ('skip', 'error')


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` section with every key and its default (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.source = 'folder'
  c.root = 'data/beans_sample'
  c.name = ''
  c.data_dir = config_dict.placeholder(str)
  c.class_prefix = config_dict.placeholder(str)
  c.hash_split = config_dict.placeholder(bool)
  c.hash_fractions = (0.8, 0.1, 0.1)
  c.train_split = 'train'
  c.eval_split = 'val'
  c.image_size = config_dict.placeholder(int)
  c.teacher_image_size = config_dict.placeholder(int)
  c.batch_size = 64
  c.eval_batch_size = config_dict.placeholder(int)
  c.augment = True
  c.crop_scale = (0.08, 1.0)
  c.crop_ratio = (3 / 4, 4 / 3)
  c.flip = True
  c.randaugment_ops = 0
  c.randaugment_magnitude = 9.0
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.mix_prob = 1.0
  c.mix_switch_prob = 0.5
  c.eval_crop_fraction = 0.875
  c.on_corrupt = 'skip'
  c.corrupt_retries = 8
  c.cache = False
  c.threads = 0
  c.prefetch = 2
  return c


def _range(value, key: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f'config.data.{key} must be a pair (low, high), got {value!r}') from None
  if not 0 < lo <= hi:
    raise ValueError(f'config.data.{key} must satisfy 0 < low <= high, got {value!r}')
  return lo, hi


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key of a `config.data` section."""
  missing = [k for k in default_data_config() if k not in config]
  if missing:
    raise ValueError(f'config.data lacks key {missing[0]!r} (start from default_data_config())')
  if config.source not in SOURCES:
    raise ValueError(f'config.data.source must be one of {SOURCES}, got {config.source!r}')
  if config.source == 'tfds' and not config.name:
    raise ValueError("config.data.name must name a TFDS dataset when source='tfds'")
  if config.source == 'folder' and not config.root:
    raise ValueError("config.data.root must be set when source='folder'")
  if config.on_corrupt not in ON_CORRUPT:
    raise ValueError(f'config.data.on_corrupt must be one of {ON_CORRUPT}, '
                     f'got {config.on_corrupt!r}')
  for key in ('batch_size', 'eval_batch_size', 'image_size', 'teacher_image_size'):
    value = config[key]
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f'config.data.{key} must be a positive int, got {value!r}')
  for key in ('corrupt_retries', 'randaugment_ops', 'threads', 'prefetch'):
    if not isinstance(config[key], int) or config[key] < 0:
      raise ValueError(f'config.data.{key} must be a non-negative int, got {config[key]!r}')
  _range(config.crop_scale, 'crop_scale')
  _range(config.crop_ratio, 'crop_ratio')
  if config.crop_scale[1] > 1:
    raise ValueError(f'config.data.crop_scale must be within (0, 1], got {config.crop_scale!r}')
  if not 0 < config.eval_crop_fraction <= 1:
    raise ValueError('config.data.eval_crop_fraction must be in (0, 1], '
                     f'got {config.eval_crop_fraction!r}')
  if not 0 <= config.randaugment_magnitude <= 10:
    raise ValueError('config.data.randaugment_magnitude must be in [0, 10], '
                     f'got {config.randaugment_magnitude!r}')
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if config[key] < 0:
      raise ValueError(f'config.data.{key} must be >= 0, got {config[key]!r}')
  for key in ('mix_prob', 'mix_switch_prob'):
    if not 0 <= config[key] <= 1:
      raise ValueError(f'config.data.{key} must be in [0, 1], got {config[key]!r}')
