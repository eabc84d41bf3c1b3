"""`kdflax.data.photos`: a configured split's photos as the evaluation views a model is served."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import data_fixtures as fx
from PIL import Image

from kdflax.data.config import default_data_config
from kdflax.data.photos import ImageError, decode_photo, save_split_photos, split_photos, spread
from kdflax.data.pipeline import source_from_config
from kdflax.export.images import load_image


def test_spread_keeps_ends_and_is_unique():
  np.testing.assert_array_equal(spread(5, None), np.arange(5))
  np.testing.assert_array_equal(spread(5, 9), np.arange(5))
  rows = spread(100, 7)
  assert len(rows) == 7 and rows[0] == 0 and rows[-1] == 99
  assert np.all(np.diff(rows) > 0)


def test_folder_split_equals_export_images_and_covers_classes(tmp_path):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 4, 'val': 2})
  c = default_data_config()
  c.update(root=str(root), eval_split='val')
  images, labels, names = split_photos(source_from_config(c), 'train', 48, limit=6)
  assert names == ('angular_leaf_spot', 'bean_rust', 'healthy')
  assert images.shape == (6, 48, 48, 3) and images.dtype == np.uint8
  assert sorted(set(labels.tolist())) == [0, 1, 2]  # spread over the class-sorted rows
  files = sorted((root / 'train').glob('*/*.jpg'))
  rows = spread(len(files), 6)
  expected = np.stack([load_image(files[i], 48) for i in rows])
  np.testing.assert_array_equal(images, expected)  # the same pixels as `kdflax export`


def test_tfds_split_tomato_classes_from_encoded_bytes():
  examples = [{'image': fx.encode(np.full((10 + i % 3, 12, 3), i, np.uint8)),
               'label': i % 38, 'image/filename': f'{i:04d}.JPG'} for i in range(152)]
  c = default_data_config()
  c.update(source='tfds', name='plant_village', data_dir='/nonexistent')
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': examples})):
    images, labels, names = split_photos(source_from_config(c), 'validation', 16)
  assert len(names) == 10 and all(n.startswith('Tomato___') for n in names)
  assert images.shape[1:] == (16, 16, 3) and 0 < len(images) < 40
  # Each view is a flat image of value i, labelled by its tomato class i % 38 - 28.
  values = images[:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(labels, values % 38 - 28)
  assert np.all(images == images[:, :1, :1, :1])


def test_undecodable_photo_is_named_and_skipped(tmp_path, capsys):
  root = fx.copy_beans(tmp_path / 'beans', {'train': 2})
  bad = sorted((root / 'train' / 'healthy').glob('*.jpg'))[0]
  fx.truncate(bad, 0.1)
  with pytest.raises(ImageError, match=bad.name):
    decode_photo(bad)
  c = default_data_config()
  c.update(root=str(root), eval_split='')
  images, labels, _ = split_photos(source_from_config(c), 'train', 24)
  assert len(images) == 5 and bad.name in capsys.readouterr().err
  with pytest.raises(ImageError, match='<encoded bytes>'):
    decode_photo(b'not an image')


def test_save_split_photos_writes_a_labelled_folder_of_the_originals(tmp_path):
  examples = [{'image': fx.encode(np.full((10, 12, 3), i, np.uint8)), 'label': i % 38,
               'image/filename': f'{i:04d} a/b.JPG'} for i in range(152)]
  c = default_data_config()
  c.update(source='tfds', name='plant_village', data_dir='/nonexistent')
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': examples})):
    paths = save_split_photos(source_from_config(c), 'test', str(tmp_path / 'out'), limit=5)
  assert len(paths) == 5
  by_value = dict(enumerate(examples))
  for path in paths:
    p = pathlib.Path(path)
    assert p.parent.parent == tmp_path / 'out' and p.parent.name.startswith('Tomato___')
    value = int(np.asarray(Image.open(p))[0, 0, 0])
    assert p.read_bytes() == by_value[value]['image']  # the stored bytes, unchanged
    assert p.parent.name == tfds.builder('plant_village').info.features['label'].names[
        value % 38]
