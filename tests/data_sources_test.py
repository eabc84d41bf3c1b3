"""Sources: image folders and TFDS (mocked, never downloaded), class order, hash splits."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import data_fixtures as fx

from kdflax.data import sources
from kdflax.data.sources import FolderSource, TfdsSource

# ---------------------------------------------------------------------------- image folders


def test_folder_classes_sorted_and_files_listed(tmp_path):
  for name in ('zeta', 'Alpha', 'mid'):
    d = tmp_path / 'train' / name
    d.mkdir(parents=True)
    for f in ('b.JPG', 'a.png', 'c.jpeg', 'notes.txt', '.hidden.jpg'):
      (d / f).write_bytes(b'x')
  (tmp_path / 'train' / '.cache').mkdir()
  src = FolderSource(str(tmp_path))
  assert src.labels == ('Alpha', 'mid', 'zeta')  # sorted, hidden folders ignored
  rec = src.records('train')
  assert src.num_examples('train') == 9
  assert list(rec.keys[:3]) == ['train/Alpha/a.png', 'train/Alpha/b.JPG', 'train/Alpha/c.jpeg']
  assert list(rec.labels) == [0] * 3 + [1] * 3 + [2] * 3
  assert all(os.path.isabs(p) and p.endswith(k) for p, k in zip(rec.paths, rec.keys, strict=True))


def test_folder_real_sample_counts():
  src = FolderSource(str(fx.BEANS_SAMPLE))
  assert src.labels == ('angular_leaf_spot', 'bean_rust', 'healthy')
  assert (src.num_examples('train'), src.num_examples('val')) == (120, 45)
  assert np.bincount(src.records('val').labels).tolist() == [15, 15, 15]
  assert set(src.splits) >= {'train', 'val'}


def _one_line(excinfo):
  message = str(excinfo.value)
  assert '\n' not in message
  return message


def test_folder_empty_class_is_an_error_naming_it(tmp_path):
  fx.copy_beans(tmp_path, {'train': 1, 'val': 1})
  for f in (tmp_path / 'val' / 'bean_rust').iterdir():
    f.unlink()
  (tmp_path / 'val' / 'bean_rust' / 'README.txt').write_text('not an image')
  src = FolderSource(str(tmp_path))
  src.records('train')
  with pytest.raises(ValueError) as e:
    src.records('val')
  assert 'empty class folder' in _one_line(e)
  assert str(tmp_path / 'val' / 'bean_rust') in str(e.value)


def test_folder_missing_split_and_mismatched_classes(tmp_path):
  fx.copy_beans(tmp_path, {'train': 1, 'val': 1})
  src = FolderSource(str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    src.records('test')
  assert str(tmp_path / 'test') in _one_line(e)
  os.rename(tmp_path / 'val' / 'healthy', tmp_path / 'val' / 'zz_other')
  with pytest.raises(FileNotFoundError) as e:
    src.records('val')
  assert str(tmp_path / 'val' / 'healthy') in _one_line(e)
  (tmp_path / 'val' / 'healthy').mkdir()
  (tmp_path / 'val' / 'healthy' / 'x.jpg').write_bytes(b'x')
  with pytest.raises(ValueError) as e:
    src.records('val')
  assert str(tmp_path / 'val' / 'zz_other') in _one_line(e)
  with pytest.raises(FileNotFoundError) as e:
    FolderSource(str(tmp_path / 'nowhere'))
  assert 'nowhere' in _one_line(e)
  with pytest.raises(FileNotFoundError):
    FolderSource(str(tmp_path), class_split='test')


# ---------------------------------------------------------------------------- hash split


def test_hash_split_disjoint_complete_and_proportional():
  names = [f'leaf_{i}.JPG' for i in range(3000)]
  ids = sources.hash_split_ids(names, (0.8, 0.1, 0.1))
  assert ids.shape == (3000,) and set(ids.tolist()) == {0, 1, 2}
  counts = np.bincount(ids, minlength=3) / 3000
  np.testing.assert_allclose(counts, [0.8, 0.1, 0.1], atol=0.03)
  # Each name's split depends on the name only, not on the other names or their order.
  perm = np.random.default_rng(0).permutation(3000)
  np.testing.assert_array_equal(sources.hash_split_ids([names[i] for i in perm], (.8, .1, .1)),
                                ids[perm])
  # Growing a fraction only moves names into that split.
  wider = sources.hash_split_ids(names, (0.9, 0.05, 0.05))
  assert np.all(wider[ids == 0] == 0)
  with pytest.raises(ValueError, match='sum to 1'):
    sources.hash_split_ids(names, (0.8, 0.1))


def test_hash_split_is_stable_across_python_hash_seeds():
  names = [f'x{i}.jpg' for i in range(64)]
  code = ('from kdflax.data.sources import hash_split_ids; '
          f'print(hash_split_ids({names!r}, (0.5, 0.25, 0.25)).tolist())')
  outs = set()
  for seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         check=True, cwd=str(fx.ROOT))
    outs.add(out.stdout.strip())
  assert outs == {str(sources.hash_split_ids(names, (0.5, 0.25, 0.25)).tolist())}
  assert len(set(eval(outs.pop()))) == 3  # not all in one split


# ---------------------------------------------------------------------------- TFDS (mocked)


def _pv_examples(n=120, reverse=False):
  rng = np.random.default_rng(0)
  examples = []
  for i in range(n):
    image = rng.integers(0, 256, (12 + i % 5, 14, 3), dtype=np.uint8)
    examples.append({'image': fx.encode(image), 'label': i % 38,
                     'image/filename': f'{i:04d}_leaf.JPG'})
  return examples[::-1] if reverse else examples


def test_plant_village_tomato_filter_remap_and_hash_split():
  examples = _pv_examples()
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': examples})):
    src = TfdsSource('plant_village', data_dir='/nonexistent')
    names = tfds.builder('plant_village').info.features['label'].names
    splits = {s: src.records(s) for s in ('train', 'validation', 'test')}
  tomato = [n for n in names if n.startswith('Tomato___')]
  assert len(tomato) == 10 and src.labels == tuple(tomato)  # TFDS label order, not sorted
  assert src.splits == ('train', 'validation', 'test')
  expected = {e['image/filename']: tomato.index(names[e['label']]) for e in examples
              if names[e['label']].startswith('Tomato___')}
  got = {}
  for rec in splits.values():
    assert rec.encoded is not None and rec.paths is None
    for key, label, blob in zip(rec.keys, rec.labels, rec.encoded, strict=True):
      assert key not in got  # disjoint
      got[key] = int(label)
      assert blob == next(e['image'] for e in examples if e['image/filename'] == key)
  assert got == expected  # exactly the tomato examples, remapped 28..37 -> 0..9
  assert all(len(r) > 0 for r in splits.values())
  # The split of an image depends on its file name only, not on the read order.
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': _pv_examples(reverse=True)})):
    again = TfdsSource('plant_village')
    for s, rec in splits.items():
      assert sorted(again.records(s).keys) == sorted(rec.keys)


def test_plant_village_all_classes_without_hash_split():
  examples = _pv_examples(n=76)
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': examples})):
    src = TfdsSource('plant_village', class_prefix='', hash_split=False)
    rec = src.records('train')
  assert len(src.labels) == 38
  np.testing.assert_array_equal(rec.labels, [e['label'] for e in examples])


def test_beans_real_splits_and_class_names():
  rng = np.random.default_rng(1)
  per_split = {
      s: [{'image': fx.encode(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)),
           'label': (i + k) % 3} for i in range(n)]
      for k, (s, n) in enumerate((('train', 7), ('validation', 4), ('test', 5)))}
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds(per_split)):
    src = TfdsSource('beans')
    counts = {s: src.num_examples(s) for s in per_split}
    rec = src.records('validation')
  assert src.labels == ('angular_leaf_spot', 'bean_rust', 'healthy')
  assert counts == {'train': 7, 'validation': 4, 'test': 5}
  np.testing.assert_array_equal(rec.labels, [e['label'] for e in per_split['validation']])
  assert len(set(rec.keys)) == 4 and all('validation' in k for k in rec.keys)  # TFDS ids
  assert list(rec.encoded) == [e['image'] for e in per_split['validation']]


def test_tfds_not_prepared_and_unknown_are_clear_errors(tmp_path):
  src = TfdsSource('beans', data_dir=str(tmp_path))  # real builder, nothing prepared
  with pytest.raises(FileNotFoundError) as e:
    src.records('train')
  assert 'not prepared' in _one_line(e) and str(tmp_path) in str(e.value)
  assert not any(tmp_path.iterdir())  # nothing was downloaded
  with pytest.raises(ValueError, match='unknown TFDS dataset'):
    TfdsSource('no_such_dataset_kdflax', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='no class name starts with'):
    TfdsSource('beans', data_dir=str(tmp_path), class_prefix='Tomato___')


def test_plant_village_through_make_datasets():
  from kdflax.data.config import default_data_config
  from kdflax.data.pipeline import make_datasets

  examples = _pv_examples(n=200)
  c = default_data_config()
  c.update(source='tfds', name='plant_village', data_dir='/nonexistent', eval_split='validation',
           batch_size=4, eval_batch_size=4)
  with tfds.testing.mock_data(as_dataset_fn=fx.fake_tfds({'train': examples})):
    data = make_datasets(c, image_size=16)
  tomato = [e for e in examples if 28 <= e['label'] < 38]
  assert data.num_classes == 10 and data.num_train + data.num_eval < len(tomato)
  assert data.num_train == data.source.num_examples('train') > data.num_eval > 0
  batch = next(data.train())  # outside the mock: the encoded images are in memory
  assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].std() > 0.05
  truth = {e['image/filename']: e['label'] - 28 for e in tomato}
  keys = data.source.records('train').keys
  first = data.plan.step(0)['candidates'][:, 0]
  np.testing.assert_array_equal(batch['label'], [truth[keys[i]] for i in first])
  masks = np.concatenate([b['mask'] for b in data.eval()])
  assert masks.sum() == data.num_eval
