"""Data checks at start: errors for unusable splits, warnings for likely mistakes."""

import logging
import shutil

import numpy as np
import pytest
from helpers import data_fixtures as fx

from kdflax.data.config import default_data_config
from kdflax.data.pipeline import make_datasets
from kdflax.data.records import Records
from kdflax.data.sanity import check_splits, shared_photos


def _records(labels, blobs=None):
  n = len(labels)
  blobs = blobs if blobs is not None else [f'img{i}'.encode() for i in range(n)]
  return Records(np.array([f'k{i}' for i in range(n)]), np.asarray(labels, np.int32),
                 encoded=np.array(blobs, dtype=object))


def test_errors_for_what_cannot_train():
  with pytest.raises(ValueError, match='1 class .*at least 2'):
    check_splits(('healthy',), _records([0, 0]), None, 'data/x')
  with pytest.raises(ValueError, match='train split has no images'):
    check_splits(('a', 'b'), _records([]), None)
  with pytest.raises(ValueError, match='eval split has no images'):
    check_splits(('a', 'b'), _records([0, 1]), _records([]))


def test_warnings_for_missing_class_imbalance_and_shared_photos():
  assert check_splits(('a', 'b'), _records([0, 1, 1]), _records([0, 1], [b'x', b'y'])) == []
  (empty,) = check_splits(('a', 'b', 'c'), _records([0, 1]), None)
  assert 'no train images for class(es) c' in empty
  (imbalance,) = check_splits(('a', 'b'), _records([0] * 23 + [1] * 2), None)
  assert 'a has 23 train images, b 2' in imbalance
  train = _records([0, 1, 1], [b'same', b'other', b'x' * 4])
  evaluation = _records([0, 1], [b'same', b'diff'])  # b'diff' has a train-sized twin, not same
  assert shared_photos(train, evaluation) == 1
  (shared,) = check_splits(('a', 'b'), train, evaluation)
  assert '1 photo(s) are in both the train and the eval split' in shared


def test_folder_with_one_class_fails_and_a_leaked_photo_warns(tmp_path, caplog):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 3, 'val': 1})
  leaked = next((root / 'train' / 'healthy').glob('*.jpg'))
  shutil.copyfile(leaked, root / 'val' / 'healthy' / 'copy.jpg')
  c = default_data_config()
  c.update(root=str(root), eval_split='val', batch_size=2)
  with caplog.at_level(logging.WARNING):
    make_datasets(c, image_size=16)
  assert '1 photo(s) are in both' in caplog.text and str(root) in caplog.text
  for name in ('angular_leaf_spot', 'bean_rust'):
    for split in ('train', 'val'):
      shutil.rmtree(root / split / name)
  with pytest.raises(ValueError, match='1 class'):
    make_datasets(c, image_size=16)
