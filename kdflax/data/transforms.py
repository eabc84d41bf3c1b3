"""Per-example and per-batch image transforms (TensorFlow ops, used inside tf.data).

Inputs are decoded images `(H, W, 3)` uint8 of any size; outputs are float32 in [0, 1], NHWC,
at fixed square sizes. All randomness is stateless, from an explicit seed pair, so the same
seed always gives the same pixels.

- `train_views`: ONE random-resized crop (+ horizontal flip, + optional RandAugment) of the
  image, resized to each requested size: the teacher's and the student's images show the same
  crop at their own resolutions.
- `eval_views`: per size, the evaluation view `kdflax.data.eval_view.eval_view` (the centre square
  box of "short side to `floor(size / crop_fraction)`, centre `size x size`", sampled as
  MediaPipe samples a region of interest): the one definition that export, `kdflax predict`
  and apps use too, so all of them feed a model the same pixels.
- `mix_batch`: mixup / CutMix within pairs of rows of a batch, the same for every view, with
  soft labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf

from kdflax.data import randaugment
from kdflax.data.eval_view import eval_view
from kdflax.data.plan import CUTMIX, MIXUP


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG / PNG (also GIF, BMP) bytes -> `(H, W, 3)` uint8.

  JPEGs are decoded with libjpeg's accurate integer DCT (`INTEGER_ACCURATE`, libjpeg's own
  default), not TensorFlow's default fast DCT (up to 8 levels off): the pixels PIL (export,
  `kdflax predict`) and phone decoders produce, so every evaluation sees the same view.

  Raises (inside tf.data: an error the pipeline catches) on corrupt or truncated data.
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE'),
      lambda: tf.ensure_shape(tf.io.decode_image(encoded, channels=3, expand_animations=False,
                                                 dtype=tf.uint8), [None, None, 3]))
  image.set_shape([None, None, 3])
  return image


def resize(image: tf.Tensor, height: int | tf.Tensor, width: int | tf.Tensor) -> tf.Tensor:
  """Antialiased bilinear resize of a `(H, W, 3)` image (any dtype, 0..255) -> float32 0..255."""
  return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                         method='bilinear', antialias=True)


def to_unit(image: tf.Tensor) -> tf.Tensor:
  """float32 0..255 -> float32 [0, 1]."""
  return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, scale: Sequence[float],
                       ratio: Sequence[float]) -> tuple[tf.Tensor, tf.Tensor]:
  """Inception-style random-resized-crop window of an image of `shape` (H, W, C).

  Area fraction in `scale`, aspect ratio (w / h) in `ratio`; after 10 failed attempts the whole
  image. Returns `(begin, size)` for `tf.slice`.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=tuple(ratio), area_range=tuple(scale),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin, size


def train_views(image: tf.Tensor, seed: tf.Tensor, sizes: Mapping[str, int],
                scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                flip: bool = True, randaugment_ops: int = 0,
                randaugment_magnitude: float = 9.0) -> dict[str, tf.Tensor]:
  """One shared augmented crop, resized to every size in `sizes`.

  Args:
    image: `(H, W, 3)` uint8.
    seed: `(2,)` int stateless seed of this example.
    sizes: output key -> square size, e.g. `{'image': 224, 'teacher_image': 384}`.
    scale, ratio: random-resized-crop area fraction and aspect ratio ranges.
    flip: random horizontal flip (p = 0.5).
    randaugment_ops, randaugment_magnitude: RandAugment N and M (N = 0: off), applied to the
      crop at its own resolution, before resizing.

  Returns:
    key -> `(size, size, 3)` float32 in [0, 1].
  """
  crop_seed, flip_seed, ra_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  begin, size = random_crop_window(tf.shape(image), crop_seed, scale, ratio)
  crop = tf.slice(image, begin, size)
  if flip:
    coin = tf.random.stateless_uniform([], seed=flip_seed)
    crop = tf.cond(coin < 0.5, lambda: tf.reverse(crop, axis=[1]), lambda: crop)
  if randaugment_ops > 0:
    crop = randaugment.randaugment(crop, ra_seed, randaugment_ops, randaugment_magnitude)
  return {key: to_unit(resize(crop, s, s)) for key, s in sizes.items()}


def eval_views(image: tf.Tensor, sizes: Mapping[str, int],
               crop_fraction: float = 0.875) -> dict[str, tf.Tensor]:
  """Per size: `kdflax.data.eval_view.eval_view` (centre box, MediaPipe-style bilinear), / 255.

  Runs the NumPy definition through `tf.numpy_function`, so the training pipeline's eval and
  an exported model's users see identical uint8 pixels.

  Args:
    image: `(H, W, 3)` uint8.
    sizes: output key -> square size.

  Returns:
    key -> `(size, size, 3)` float32 in [0, 1] (multiples of 1/255).
  """
  out = {}
  for key, s in sizes.items():
    view = tf.numpy_function(lambda x, s=s: eval_view(x, s, crop_fraction),
                             [tf.cast(image, tf.uint8)], tf.uint8, stateful=False)
    view.set_shape([s, s, 3])
    out[key] = tf.cast(view, tf.float32) / 255.0
  return out


def _box_mask(box: tf.Tensor, height: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
  """`(B, H, W, 1)` bool mask of relative boxes `(B, 4)` (y0, x0, y1, x1), and its area."""
  scale = tf.constant([height, width, height, width], tf.float32)
  pix = tf.cast(tf.round(box * scale), tf.int32)
  ys = tf.range(height)[None, :, None]
  xs = tf.range(width)[None, None, :]
  inside = ((ys >= pix[:, 0, None, None]) & (ys < pix[:, 2, None, None])
            & (xs >= pix[:, 1, None, None]) & (xs < pix[:, 3, None, None]))
  area = tf.cast((pix[:, 2] - pix[:, 0]) * (pix[:, 3] - pix[:, 1]), tf.float32)
  return inside[..., None], area / float(height * width)


def mix_batch(batch: Mapping[str, tf.Tensor], image_keys: Sequence[str], num_classes: int,
              partner: tf.Tensor, mode: tf.Tensor, lam: tf.Tensor,
              box: tf.Tensor) -> dict[str, tf.Tensor]:
  """Mixup / CutMix of each row with row `partner[r]`, identical for every image view.

  Args:
    batch: `image_keys` -> `(B, S, S, 3)` float32, `'label'` -> `(B,)` int32.
    image_keys: the views to mix; the first one's resolution sets CutMix's label weight.
    num_classes: K.
    partner, mode, lam, box: `(B,)` int32, `(B,)` int32, `(B,)` float32, `(B, 4)` float32, as
      from `kdflax.data.plan.mix_params`.

  Returns:
    The batch with mixed images and `'soft_label'` `(B, K)` float32 (rows sum to 1):
    `w * onehot(label) + (1 - w) * onehot(label[partner])`, where w is lambda for mixup, the
    fraction of the row's own pixels for CutMix and 1 for rows left alone. `'label'` is kept.
  """
  out = dict(batch)
  weight = tf.ones_like(lam)
  for i, key in enumerate(image_keys):
    x = batch[key]
    other = tf.gather(x, partner)
    height, width = x.shape[1], x.shape[2]
    inside, area = _box_mask(box, height, width)
    l4 = lam[:, None, None, None]
    mixed = tf.where((mode == MIXUP)[:, None, None, None], l4 * x + (1.0 - l4) * other, x)
    mixed = tf.where((mode == CUTMIX)[:, None, None, None] & inside, other, mixed)
    out[key] = mixed
    if i == 0:
      weight = tf.where(mode == MIXUP, lam, tf.where(mode == CUTMIX, 1.0 - area, weight))
  onehot = tf.one_hot(batch['label'], num_classes, dtype=tf.float32)
  w = weight[:, None]
  out['soft_label'] = w * onehot + (1.0 - w) * tf.gather(onehot, partner)
  return out
