"""The tf.data pipeline end to end, on real photos and on coloured PNGs that name themselves.

Determinism and resume are checked bit for bit; shards against the single-process batch;
eval coverage, label/image correspondence and corrupt-image handling through the images.
"""

import itertools
import os

import numpy as np
import pytest
from helpers import data_fixtures as fx

from kdflax.data import plan as plan_lib
from kdflax.data.bench import measure_throughput
from kdflax.data.config import default_data_config
from kdflax.data.pipeline import CorruptImageError, make_datasets

SIZES = {'image_size': 24, 'teacher_image_size': 40}


@pytest.fixture(scope='module')
def beans(tmp_path_factory):
  """24 real train photos (8 per class) and 12 val photos."""
  return fx.copy_beans(tmp_path_factory.mktemp('beans'), {'train': 8, 'val': 4})


@pytest.fixture(scope='module')
def colours(tmp_path_factory):
  """Solid-colour PNGs whose colour encodes their index: 18 train, 11 val."""
  root = tmp_path_factory.mktemp('colours')
  train = fx.write_colour_folder(root, 'train', {'a': 6, 'b': 7, 'c': 5})
  val = fx.write_colour_folder(root, 'val', {'a': 4, 'b': 4, 'c': 3}, start=100)
  return root, train, val


def config(root, **overrides):
  c = default_data_config()
  c.root = str(root)
  c.batch_size = 8
  c.eval_batch_size = 4
  c.crop_scale = (0.3, 1.0)
  for key, value in overrides.items():
    c[key] = value
  return c


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract(beans):
  data = make_datasets(config(beans), **SIZES)
  assert data.labels == ('angular_leaf_spot', 'bean_rust', 'healthy')
  assert (data.num_train, data.num_eval, data.steps_per_epoch, data.eval_steps) == (24, 12, 3, 3)
  batch = next(data.train())
  assert sorted(batch) == ['image', 'label', 'teacher_image']
  assert batch['image'].shape == (8, 24, 24, 3) and batch['image'].dtype == np.float32
  assert batch['teacher_image'].shape == (8, 40, 40, 3)
  assert batch['label'].dtype == np.int32 and set(batch['label']) <= {0, 1, 2}
  for key in ('image', 'teacher_image'):
    assert 0 <= batch[key].min() and batch[key].max() <= 1 and batch[key].std() > 0.05
  evals = list(data.eval())
  assert len(evals) == 3 and sorted(evals[0]) == ['image', 'label', 'mask', 'teacher_image']
  assert evals[0]['mask'].dtype == np.float32 and evals[0]['image'].shape == (4, 24, 24, 3)
  assert_same(list(data.eval()), evals)  # every pass is the same
  # Same resolution for both: no teacher_image (the teacher reads `image`).
  same = make_datasets(config(beans), image_size=24, teacher_image_size=24)
  assert sorted(next(same.train())) == ['image', 'label']


def test_same_seed_same_stream_other_seed_other_stream(beans):
  a = take(make_datasets(config(beans), **SIZES).train(), 4)  # crosses an epoch boundary
  b = take(make_datasets(config(beans), **SIZES).train(), 4)
  assert_same(a, b)
  c = take(make_datasets(config(beans), **SIZES, seed=1).train(), 1)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert not np.array_equal(a[0]['image'], a[3]['image'])  # epoch 1 is reshuffled


def test_resume_yields_the_tail_and_reads_only_what_it_needs(beans, tmp_path):
  root = fx.copy_beans(tmp_path, {'train': 8, 'val': 1})
  data = make_datasets(config(root), **SIZES)
  full = take(data.train(), 7)
  # Delete every image that steps 5 and 6 do not read: a resumed iterator never opens them.
  needed = {int(i) for s in (5, 6) for i in data.plan.step(s)['candidates'][:, 0]}
  keys = data.source.records('train').keys
  for i, key in enumerate(keys):
    if i not in needed:
      os.remove(root / key)
  resumed = data.train(start_step=5)
  tail = take(resumed, 2)
  assert_same(tail, full[5:7])
  assert resumed.step == 7 and resumed.corrupt.count == 0


def test_process_shards_union_is_the_global_batch(beans):
  opts = dict(mixup_alpha=0.4, cutmix_alpha=1.0)
  whole = take(make_datasets(config(beans, **opts), **SIZES).train(), 4)
  shards = [take(make_datasets(config(beans, **opts), **SIZES, process_index=i,
                               process_count=2).train(), 4) for i in range(2)]
  assert shards[0][0]['image'].shape[0] == 4
  assert sorted(whole[0]) == ['image', 'label', 'soft_label', 'teacher_image']
  joined = [{k: np.concatenate([p[k], q[k]]) for k in p} for p, q in zip(*shards, strict=True)]
  assert_same(joined, whole)


def test_eval_covers_every_example_once_with_a_mask(colours):
  root, _, val = colours
  expected = {i: 'abc'.index(name) for name, i in val}
  for count in (1, 2):
    seen = {}
    padding = 0
    for i in range(count):
      data = make_datasets(config(root), **SIZES, process_index=i, process_count=count)
      it = data.eval()
      assert len(it) == 3 and data.local_eval_batch_size == 4 // count
      for batch in it:
        for image, teacher, label, mask in zip(batch['image'], batch['teacher_image'],
                                               batch['label'], batch['mask'], strict=True):
          if mask == 0:
            padding += 1
            assert not image.any() and not teacher.any()
            continue
          assert mask == 1 and np.ptp(image.reshape(-1, 3), axis=0).max() < 1e-4  # one colour
          index = fx.index_of(image[0, 0])
          assert index == fx.index_of(teacher[5, 5]) and index not in seen
          seen[index] = int(label)
    assert seen == expected and padding == 1


def test_train_labels_match_their_images_and_epochs_cover_the_set(colours):
  root, train, _ = colours
  classes = {i: 'abc'.index(name) for name, i in train}
  data = make_datasets(config(root, batch_size=6, augment=False), **SIZES)
  assert data.steps_per_epoch == 3
  for epoch in range(2):
    seen = []
    for batch in take(data.train(start_step=3 * epoch), 3):
      for image, label in zip(batch['image'], batch['label'], strict=True):
        index = fx.index_of(image[3, 3])
        assert classes[index] == label
        seen.append(index)
    assert len(seen) == len(set(seen)) == 18


def test_teacher_and_student_images_show_the_same_crop(beans):
  data = make_datasets(config(beans, crop_scale=(0.08, 0.3), randaugment_ops=1),
                       image_size=20, teacher_image_size=40)
  batch = next(data.train())
  down = batch['teacher_image'].reshape(8, 20, 2, 20, 2, 3).mean(axis=(2, 4))
  matched = np.abs(down - batch['image']).mean(axis=(1, 2, 3))
  shifted = np.abs(down - np.roll(batch['image'], 1, axis=0)).mean(axis=(1, 2, 3))
  assert matched.max() < 0.02 and shifted.min() > 2 * matched.max()


def test_mixup_and_cutmix_mix_the_unmixed_batch(beans):
  opts = dict(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.5)
  mixed_data = make_datasets(config(beans, **opts), **SIZES, seed=3)
  mixed = take(mixed_data.train(), 2)
  plain = take(make_datasets(config(beans), **SIZES, seed=3).train(), 2)
  options = mixed_data.plan.mix
  modes = set()
  for step, (m, p) in enumerate(zip(mixed, plain, strict=True)):
    params = plan_lib.mix_params(3, step, 8, options)
    np.testing.assert_array_equal(m['label'], p['label'])
    np.testing.assert_allclose(m['soft_label'].sum(1), 1, atol=1e-6)
    for r in range(8):
      q, mode, lam = r ^ 1, params['mode'][r], params['lam'][r]
      modes.add(int(mode))
      own = np.eye(3)[p['label'][r]]
      other = np.eye(3)[p['label'][q]]
      for key in ('image', 'teacher_image'):
        if mode == plan_lib.MIXUP:
          np.testing.assert_allclose(m[key][r], lam * p[key][r] + (1 - lam) * p[key][q],
                                     atol=1e-6)
        else:
          from_own = np.all(m[key][r] == p[key][r], axis=-1)
          from_other = np.all(m[key][r] == p[key][q], axis=-1)
          assert np.all(from_own | from_other)
          if key == 'image':
            weight = 1.0 - from_other.mean() if mode == plan_lib.CUTMIX else 1.0
      if mode == plan_lib.MIXUP:
        weight = lam
      np.testing.assert_allclose(m['soft_label'][r], weight * own + (1 - weight) * other,
                                 atol=2e-2 if mode == plan_lib.CUTMIX else 1e-6)
  assert modes == {plan_lib.NO_MIX, plan_lib.MIXUP, plan_lib.CUTMIX}


def test_corrupt_images_are_skipped_counted_and_deterministic(tmp_path):
  clean_root = fx.copy_beans(tmp_path / 'clean', {'train': 8, 'val': 4})
  root = fx.copy_beans(tmp_path / 'bad', {'train': 8, 'val': 4})
  bad_train, bad_val = 'train/bean_rust/bean_rust_train_1.jpg', 'val/healthy/healthy_val_0.jpg'
  fx.truncate(root / bad_train)
  fx.truncate(root / bad_val)
  data = make_datasets(config(root), **SIZES)
  clean = take(make_datasets(config(clean_root), **SIZES).train(), 3)
  it = data.train()
  got = take(it, 3)  # epoch 0 reads every train record once
  assert it.corrupt.count == 1 and it.corrupt.keys == [bad_train]
  changed = [(s, r) for s in range(3) for r in range(8)
             if not np.array_equal(got[s]['image'][r], clean[s]['image'][r])]
  assert len(changed) == 1  # only the corrupt row differs, filled by a substitute
  s, r = changed[0]
  assert got[s]['image'][r].std() > 0.05
  assert_same(take(make_datasets(config(root), **SIZES).train(), 3), got)
  assert_same(take(data.train(start_step=s), 1), got[s:s + 1])
  # Eval: the corrupt image is a masked row, the rest as in the clean data.
  it = data.eval()
  evals, clean_evals = list(it), list(make_datasets(config(clean_root), **SIZES).eval())
  assert it.corrupt.keys == [bad_val]
  masks = np.concatenate([b['mask'] for b in evals])
  assert masks.sum() == 11 and masks.tolist() == [
      0.0 if k == bad_val else 1.0 for k in data.source.records('val').keys]
  ok = masks == 1
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in evals])[ok],
                                np.concatenate([b['image'] for b in clean_evals])[ok])
  # on_corrupt='error' names the file.
  strict = make_datasets(config(root, on_corrupt='error'), **SIZES)
  with pytest.raises(CorruptImageError, match=bad_train) as e:
    take(strict.train(), 3)
  assert 'JPEG' in str(e.value) and '\n' not in str(e.value)  # the decoder's reason
  with pytest.raises(CorruptImageError, match=bad_val):
    list(strict.eval())


def test_decoded_cache_changes_nothing(tmp_path):
  root = fx.copy_beans(tmp_path, {'train': 8, 'val': 2})
  bad = sorted((root / 'train' / 'healthy').iterdir())[2]
  fx.truncate(bad, keep=0.3)
  plain = make_datasets(config(root), **SIZES)
  cached = make_datasets(config(root, cache=True), **SIZES)
  it_plain, it_cached = plain.train(), cached.train()
  assert_same(take(it_cached, 4), take(it_plain, 4))
  assert it_cached.corrupt.keys == it_plain.corrupt.keys == [f'train/healthy/{bad.name}']
  assert_same(list(cached.eval()), list(plain.eval()))


def test_config_errors_are_one_line_and_name_the_key(beans, tmp_path):
  cases = [
      (dict(batch_size=7), dict(process_count=2), 'multiple of process_count'),
      (dict(source='s3'), {}, 'config.data.source'),
      (dict(on_corrupt='ignore'), {}, 'config.data.on_corrupt'),
      (dict(crop_scale=(0.5, 0.1)), {}, 'config.data.crop_scale'),
      (dict(batch_size=100), {}, 'fewer than the global batch'),
  ]
  for overrides, kwargs, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      make_datasets(config(beans, **overrides), **SIZES, **kwargs)
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='image_size'):
    make_datasets(config(beans))
  fx.copy_beans(tmp_path, {'train': 2})
  for f in (tmp_path / 'train' / 'healthy').iterdir():
    f.unlink()
  with pytest.raises(ValueError, match='empty class folder'):
    make_datasets(config(tmp_path), **SIZES)


def test_throughput_helper_counts_images(beans):
  data = make_datasets(config(beans, eval_split=''), **SIZES)
  assert data.eval_steps == 0
  stats = measure_throughput(data.train(), num_batches=3, warmup=1)
  assert stats['images'] == 24 and stats['images_per_s'] > 0
  assert stats['images_per_s'] == pytest.approx(24 / stats['seconds'])
