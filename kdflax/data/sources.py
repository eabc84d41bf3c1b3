"""Where examples come from: image folders and TFDS datasets, as `Records` tables.

A source has class names (`labels`, index = label id), a list of `splits` and, per split, a
`Records` table (`records(split)`) and its size (`num_examples(split)`). Nothing is decoded
here; the pipeline decodes the rows a schedule picks.

Image folders: `root/<split>/<class>/*.{jpg,jpeg,png}`. Class names are the sorted folder names
of the class split (the train split by default); every other split must have the same class
folders. An empty class folder, a missing split or a split with other classes is a one-line
error naming the folder.

TFDS: any image-classification dataset with an `image` (`tfds.features.Image`) and a `label`
(`tfds.features.ClassLabel`) feature, read from `data_dir` as already prepared (this module
never downloads or prepares). The encoded images are held in memory (no decode), so the
schedules can pick rows at random. Two options reshape a dataset:

- `class_prefix`: keep only classes whose name starts with it, relabelled 0..K-1 in TFDS's
  label order (`plant_village` defaults to `'Tomato___'`: its 10 tomato classes).
- `hash_split`: split the `train` split into `train` / `validation` / `test` by a SHA-256 hash
  of each image's file name (`image/filename`), with fractions `hash_fractions`: stable across
  runs, machines and Python hash seeds, disjoint, and independent of read order
  (`plant_village` has only `train` and defaults to this).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np

from kdflax.data.records import Records

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
HASH_SPLITS = ('train', 'validation', 'test')

# Per-dataset defaults for options left unset (None): TFDS name -> option -> value.
TFDS_DEFAULTS = {
    'plant_village': {'class_prefix': 'Tomato___', 'hash_split': True},
}


# ---------------------------------------------------------------------------- hash split


def hash_unit(name: str) -> float:
  """A stable number in [0, 1) from `name` (first 64 bits of its SHA-256)."""
  digest = hashlib.sha256(name.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def hash_split_ids(names: Sequence[str], fractions: Sequence[float]) -> np.ndarray:
  """`(N,)` int: index of the split each name falls in, by `hash_unit` and cumulative fractions.

  Args:
    names: N stable names (file names).
    fractions: non-negative fractions, one per split, summing to 1.
  """
  fractions = np.asarray(fractions, np.float64)
  if fractions.ndim != 1 or np.any(fractions < 0) or abs(fractions.sum() - 1.0) > 1e-6:
    raise ValueError(f'hash_fractions must be non-negative and sum to 1, got {tuple(fractions)}')
  edges = np.cumsum(fractions)[:-1]
  units = np.array([hash_unit(n) for n in names], np.float64)
  return np.searchsorted(edges, units, side='right').astype(np.int32)


# ---------------------------------------------------------------------------- image folders


def _visible_dirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


class FolderSource:
  """Image folders `root/<split>/<class>/*.{jpg,jpeg,png}` (extensions case-insensitive)."""

  def __init__(self, root: str, class_split: str = 'train',
               extensions: Sequence[str] = IMAGE_EXTENSIONS):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.extensions = tuple(e.lower() for e in extensions)
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f'image folder root not found: {self.root}')
    split_dir = self._split_dir(class_split)
    labels = _visible_dirs(split_dir)
    if not labels:
      raise ValueError(f'no class folders in {split_dir} (expected {split_dir}/<class>/*.jpg)')
    self.labels: tuple[str, ...] = tuple(labels)
    self._cache: dict[str, Records] = {}

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(_visible_dirs(self.root))

  def _split_dir(self, split: str) -> str:
    path = os.path.join(self.root, split)
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f'image folder split not found: {path} (expected {self.root}/<split>/<class>/*.jpg)')
    return path

  def records(self, split: str) -> Records:
    """All images of `split`, sorted by class then file name; keys are paths below `root`."""
    if split in self._cache:
      return self._cache[split]
    split_dir = self._split_dir(split)
    found = _visible_dirs(split_dir)
    missing = [c for c in self.labels if c not in found]
    extra = [c for c in found if c not in self.labels]
    if missing:
      raise FileNotFoundError(f'class folder missing: {os.path.join(split_dir, missing[0])}')
    if extra:
      raise ValueError(f'unexpected class folder {os.path.join(split_dir, extra[0])} '
                       f'(classes are those of the class split: {", ".join(self.labels)})')
    paths, labels = [], []
    for label, name in enumerate(self.labels):
      class_dir = os.path.join(split_dir, name)
      files = sorted(e.name for e in os.scandir(class_dir)
                     if e.is_file() and not e.name.startswith('.')
                     and os.path.splitext(e.name)[1].lower() in self.extensions)
      if not files:
        raise ValueError(f'empty class folder: {class_dir} '
                         f'(no {"/".join(self.extensions)} files)')
      paths += [os.path.join(class_dir, f) for f in files]
      labels += [label] * len(files)
    paths = np.array(paths, dtype=str)
    keys = np.array([os.path.relpath(p, self.root) for p in paths], dtype=str)
    records = Records(keys=keys, labels=np.array(labels, np.int32), paths=paths)
    self._cache[split] = records
    return records

  def num_examples(self, split: str) -> int:
    return len(self.records(split))


# ---------------------------------------------------------------------------- TFDS


class TfdsSource:
  """A prepared TFDS image-classification dataset (never downloaded here).

  Args:
    name: TFDS name, optionally with config/version (`'beans'`, `'plant_village:1.0.2'`).
    data_dir: TFDS data directory (None: TFDS's default, `~/tensorflow_datasets`).
    class_prefix: keep only classes whose name starts with this (None: the dataset's default
      from `TFDS_DEFAULTS`, else keep all).
    hash_split: split `train` into `HASH_SPLITS` by hashing file names (None: dataset default).
    hash_fractions: fractions of `HASH_SPLITS`.
    image_key, label_key, filename_key: feature names.
  """

  def __init__(self, name: str, data_dir: str | None = None, class_prefix: str | None = None,
               hash_split: bool | None = None,
               hash_fractions: Sequence[float] = (0.8, 0.1, 0.1), image_key: str = 'image',
               label_key: str = 'label', filename_key: str = 'image/filename'):
    import tensorflow_datasets as tfds  # heavy; only TFDS users pay for it

    self._tfds = tfds
    base = name.split(':')[0].split('/')[0]
    defaults = TFDS_DEFAULTS.get(base, {})
    self.name = name
    self.data_dir = data_dir
    self.class_prefix = defaults.get('class_prefix', '') if class_prefix is None else class_prefix
    self.hash_split = bool(defaults.get('hash_split', False) if hash_split is None
                           else hash_split)
    self.hash_fractions = tuple(float(f) for f in hash_fractions)
    if self.hash_split and len(self.hash_fractions) != len(HASH_SPLITS):
      raise ValueError(f'hash_fractions needs {len(HASH_SPLITS)} values {HASH_SPLITS}, '
                       f'got {self.hash_fractions}')
    self.image_key, self.label_key, self.filename_key = image_key, label_key, filename_key
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
      raise ValueError(f'unknown TFDS dataset {name!r}: {str(e).splitlines()[0]}') from None
    features = self._builder.info.features
    feature = lambda key: features[key] if key in features else None
    if not isinstance(feature(image_key), tfds.features.Image):
      raise ValueError(f'TFDS dataset {name!r} has no image feature {image_key!r} '
                       f'(features: {", ".join(features.keys())})')
    if not isinstance(feature(label_key), tfds.features.ClassLabel):
      raise ValueError(f'TFDS dataset {name!r} has no ClassLabel feature {label_key!r} '
                       f'(features: {", ".join(features.keys())})')
    all_names = list(features[label_key].names)
    keep = [i for i, n in enumerate(all_names) if n.startswith(self.class_prefix)]
    if not keep:
      raise ValueError(f'TFDS dataset {name!r}: no class name starts with '
                       f'{self.class_prefix!r}')
    self.labels: tuple[str, ...] = tuple(all_names[i] for i in keep)
    # TFDS label id -> our label id (-1: filtered out), in TFDS's label order.
    self._remap = np.full(len(all_names), -1, np.int32)
    self._remap[keep] = np.arange(len(keep), dtype=np.int32)
    self._has_filename = filename_key in features
    if self.hash_split and not self._has_filename:
      raise ValueError(f'TFDS dataset {name!r}: hash_split needs the {filename_key!r} feature')
    self._cache: dict[str, Records] = {}

  @property
  def splits(self) -> tuple[str, ...]:
    if self.hash_split:
      return HASH_SPLITS
    return tuple(self._builder.info.splits.keys())

  def _read(self, split: str) -> Records:
    """Every kept example of a TFDS split, encoded bytes in memory, in TFDS's read order."""
    tfds = self._tfds
    try:
      ds = self._builder.as_dataset(
          split=split, shuffle_files=False,
          decoders={self.image_key: tfds.decode.SkipDecoding()},
          read_config=tfds.ReadConfig(add_tfds_id=True))
    except AssertionError:
      root = self.data_dir or '~/tensorflow_datasets'
      raise FileNotFoundError(
          f'TFDS dataset {self.name!r} is not prepared in {root} (this pipeline never '
          f'downloads: run `tfds build {self.name} --data_dir={root}` first)') from None
    except ValueError as e:
      raise ValueError(f'TFDS dataset {self.name!r}: bad split {split!r} '
                       f'({str(e).splitlines()[0]})') from None
    keys, labels, encoded = [], [], []
    for ex in ds.batch(1024).as_numpy_iterator():
      label = self._remap[ex[self.label_key].astype(np.int64)]
      keep = label >= 0
      if self._has_filename:
        names = ex[self.filename_key]
      else:
        names = ex['tfds_id']
      keys += [n.decode('utf-8') for n in names[keep]]
      labels.append(label[keep])
      encoded += list(ex[self.image_key][keep])
    blobs = np.empty(len(encoded), dtype=object)  # 1-D array of bytes objects
    blobs[:] = encoded
    return Records(keys=np.array(keys, dtype=str),
                   labels=np.concatenate(labels or [np.zeros(0, np.int32)]), encoded=blobs)

  def records(self, split: str) -> Records:
    if split in self._cache:
      return self._cache[split]
    if not self.hash_split:
      self._cache[split] = self._read(split)
    else:
      if split not in HASH_SPLITS:
        raise ValueError(f'TFDS dataset {self.name!r} is hash-split: split must be one of '
                         f'{HASH_SPLITS}, got {split!r}')
      everything = self._read('train')
      ids = hash_split_ids(everything.keys, self.hash_fractions)
      for i, s in enumerate(HASH_SPLITS):
        self._cache[s] = everything.select(ids == i)
    return self._cache[split]

  def num_examples(self, split: str) -> int:
    return len(self.records(split))
