"""Transforms: eval crop geometry, the shared train crop, RandAugment vs PIL, mixup / CutMix."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from kdflax.data import eval_view, transforms
from kdflax.data import randaugment as ra
from kdflax.data.plan import CUTMIX, MIXUP, NO_MIX

RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 200, (37, 45, 3), dtype=np.uint8)
_yy, _xx = np.mgrid[0:40, 0:52]
SMOOTH = np.stack([_yy * 5 + 20, _xx * 4 + 10, (_yy + _xx) * 2 + 30], -1).astype(np.uint8)


def test_eval_view_is_the_centre_crop_after_short_side_resize():
  image = RNG.integers(0, 256, (256, 320, 3), dtype=np.uint8)
  # 224 / 0.875 = 256 = the short side: no resampling, only the centre crop.
  out = transforms.eval_views(tf.constant(image), {'image': 224}, 0.875)['image'].numpy()
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, image[16:240, 48:272] / 255.0, atol=1e-6)
  # Portrait input, two sizes: each is its own short-side resize then centre crop.
  tall = RNG.integers(0, 256, (90, 60, 3), dtype=np.uint8)
  views = transforms.eval_views(tf.constant(tall), {'image': 16, 'teacher_image': 32}, 0.5)
  for key, size in (('image', 16), ('teacher_image', 32)):
    assert views[key].shape == (size, size, 3)
    np.testing.assert_array_equal(np.round(views[key].numpy() * 255),
                                  eval_view.eval_view(tall, size, 0.5))


def test_train_views_share_one_crop_and_are_seeded():
  image = tf.constant(SMOOTH)
  sizes = {'image': 16, 'teacher_image': 32}
  a = transforms.train_views(image, tf.constant([1, 2], tf.int64), sizes, scale=(0.2, 0.5))
  b = transforms.train_views(image, tf.constant([1, 2], tf.int64), sizes, scale=(0.2, 0.5))
  c = transforms.train_views(image, tf.constant([1, 3], tf.int64), sizes, scale=(0.2, 0.5))
  for key in sizes:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    v = a[key].numpy()
    assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
  assert not np.array_equal(a['image'].numpy(), c['image'].numpy())
  # The teacher view, averaged down 2x2, is the student view (same crop, same flip).
  down = a['teacher_image'].numpy().reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
  assert np.abs(down - a['image'].numpy()).mean() < 0.01
  assert np.abs(down - c['image'].numpy()).mean() > 0.03


def test_flip_happens_about_half_the_time():
  image = tf.constant(SMOOTH[:40, :40])
  flipped = 0
  for s in range(40):
    out = transforms.train_views(image, tf.constant([0, s], tf.int64), {'image': 40},
                                 scale=(1, 1), ratio=(1, 1))['image'].numpy()
    same = np.allclose(out, SMOOTH[:40, :40] / 255.0, atol=1e-5)
    mirrored = np.allclose(out, SMOOTH[:40, :40][:, ::-1] / 255.0, atol=1e-5)
    assert same != mirrored
    flipped += mirrored
  assert 8 <= flipped <= 32


@pytest.mark.parametrize('name,enhance', [
    ('color', ImageEnhance.Color), ('contrast', ImageEnhance.Contrast),
    ('brightness', ImageEnhance.Brightness), ('sharpness', ImageEnhance.Sharpness)])
def test_enhance_ops_match_pil(name, enhance):
  for magnitude, sign in ((5, 1.0), (5, -1.0), (10, 1.0)):
    ours = ra.apply_op(NOISE, name, magnitude, sign).numpy().astype(int)
    ref = np.asarray(enhance(Image.fromarray(NOISE)).enhance(1 + sign * magnitude / 10 * 0.9))
    assert np.abs(ours - ref.astype(int)).max() <= 1, (name, magnitude, sign)


def test_histogram_and_bit_ops_match_pil():
  pil = Image.fromarray(NOISE)
  same = lambda a, b, tol=0: np.abs(a.numpy().astype(int) - np.asarray(b).astype(int)).max() <= tol
  assert same(ra.apply_op(NOISE, 'equalize', 5), ImageOps.equalize(pil))
  assert same(ra.apply_op(NOISE, 'auto_contrast', 5), ImageOps.autocontrast(pil), tol=1)
  assert same(ra.apply_op(NOISE, 'solarize', 5), ImageOps.solarize(pil, 128))
  assert same(ra.apply_op(NOISE, 'posterize', 5), ImageOps.posterize(pil, 6))
  assert same(ra.apply_op(NOISE, 'identity', 9), pil)


def test_geometric_ops_match_pil_on_a_smooth_image():
  pil, fill = Image.fromarray(SMOOTH), (128, 128, 128)
  inner = (slice(6, -6), slice(6, -6))
  cases = {
      ('rotate', 10 / 3): pil.rotate(10, resample=Image.BILINEAR, fillcolor=fill),
      ('shear_x', 10 / 3): pil.transform(pil.size, Image.AFFINE, (1, 0.1, 0, 0, 1, 0),
                                         resample=Image.BILINEAR, fillcolor=fill),
      ('shear_y', 10 / 3): pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0.1, 1, 0),
                                         resample=Image.BILINEAR, fillcolor=fill),
  }
  for (name, magnitude), ref in cases.items():
    ours = ra.apply_op(SMOOTH, name, magnitude).numpy().astype(int)
    assert np.abs(ours - np.asarray(ref).astype(int))[inner].max() <= 2, name
  # translate_x moves the content left by level * 0.45 * width pixels: 10 here.
  moved = ra.apply_op(SMOOTH, 'translate_x', 100 / (0.45 * 52)).numpy().astype(int)
  assert np.abs(moved[:, :42] - SMOOTH[:, 10:].astype(int)).max() <= 1
  assert np.all(np.abs(moved[:, 43:] - 128) <= 1)


def test_randaugment_is_seeded_and_keeps_shape():
  image = tf.constant(NOISE)
  a = ra.randaugment(image, tf.constant([4, 5], tf.int64), num_ops=3, magnitude=9)
  b = ra.randaugment(image, tf.constant([4, 5], tf.int64), num_ops=3, magnitude=9)
  assert a.dtype == tf.uint8 and a.shape == NOISE.shape
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  outs = {ra.randaugment(image, tf.constant([4, s], tf.int64), 2, 9).numpy().tobytes()
          for s in range(8)}
  assert len(outs) >= 6
  with pytest.raises(ValueError, match='magnitude'):
    ra.randaugment(image, tf.constant([0, 0], tf.int64), 2, 11)


def test_mix_batch_mixup_cutmix_and_soft_labels():
  b, k = 6, 4
  student = np.stack([np.full((8, 8, 3), i / 10, np.float32) for i in range(b)])
  teacher = np.stack([np.full((16, 16, 3), i / 10, np.float32) for i in range(b)])
  labels = np.array([0, 1, 2, 3, 1, 1], np.int32)
  partner = np.arange(b) ^ 1
  mode = np.array([MIXUP, MIXUP, CUTMIX, CUTMIX, NO_MIX, NO_MIX], np.int32)
  lam = np.array([0.7, 0.7, 0.0, 0.0, 1.0, 1.0], np.float32)
  box = np.zeros((b, 4), np.float32)
  box[2:4] = [0.25, 0.0, 0.75, 0.5]  # rows 2..5 of 8, columns 0..3: a quarter of the image
  out = transforms.mix_batch({'image': tf.constant(student), 'teacher_image': tf.constant(teacher),
                              'label': tf.constant(labels)}, ['image', 'teacher_image'], k,
                             tf.constant(partner), tf.constant(mode), tf.constant(lam),
                             tf.constant(box))
  img, tea, soft = out['image'].numpy(), out['teacher_image'].numpy(), out['soft_label'].numpy()
  np.testing.assert_allclose(img[0], 0.7 * 0.0 + 0.3 * 0.1, atol=1e-6)
  np.testing.assert_allclose(img[1], 0.7 * 0.1 + 0.3 * 0.0, atol=1e-6)
  np.testing.assert_allclose(tea[0], 0.03, atol=1e-6)
  assert np.all(img[2, 2:6, 0:4] == np.float32(0.3)) and img[2].mean() == pytest.approx(
      0.75 * 0.2 + 0.25 * 0.3)
  assert np.all(tea[2, 4:12, 0:8] == np.float32(0.3)) and np.all(tea[2, :4] == np.float32(0.2))
  np.testing.assert_array_equal(img[4:], student[4:])
  np.testing.assert_allclose(soft.sum(1), 1, atol=1e-6)
  np.testing.assert_allclose(soft[0], [0.7, 0.3, 0, 0], atol=1e-6)
  np.testing.assert_allclose(soft[2], [0, 0, 0.75, 0.25], atol=1e-6)
  np.testing.assert_allclose(soft[4], [0, 1, 0, 0])
  np.testing.assert_array_equal(out['label'].numpy(), labels)
