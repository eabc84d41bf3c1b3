"""RandAugment (Cubuk et al., 2019) with stateless randomness, on `(H, W, 3)` uint8 images.

`randaugment(image, seed, num_ops, magnitude)` applies `num_ops` operations, each drawn
uniformly from `OPS` with the shared magnitude M in [0, 10] (level = M / 10); signed operations
get a random sign. Magnitude ranges follow the paper / timm: rotate 30 degrees, shear 0.3,
translate 0.45 of the side, enhance factors 1 +- 0.9, solarize threshold 256 -> 0,
posterize 8 -> 4 bits. Geometric operations fill with grey (128). Images of any size.
"""

from __future__ import annotations

import math

import tensorflow as tf

FILL = 128.0


def _blend(image: tf.Tensor, degenerate: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped, float 0..255."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _transform(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Projective transform; `matrix` (8,) maps output (x, y) to input coordinates."""
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(matrix, tf.float32)[None], output_shape=shape,
      fill_value=FILL, interpolation='BILINEAR', fill_mode='CONSTANT')
  return out[0]


def _rotate(image, level, sign):
  angle = sign * level * 30.0 * math.pi / 180.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  c, s = tf.cos(angle), tf.sin(angle)
  return _transform(image, tf.stack([c, -s, cx - c * cx + s * cy,
                                     s, c, cy - s * cx - c * cy, 0.0, 0.0]))


def _shear_x(image, level, sign):
  return _transform(image, tf.stack([1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _shear_y(image, level, sign):
  return _transform(image, tf.stack([1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0, 0.0, 0.0]))


def _translate_x(image, level, sign):
  t = sign * level * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, t, 0.0, 1.0, 0.0, 0.0, 0.0]))


def _translate_y(image, level, sign):
  t = sign * level * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, t, 0.0, 0.0]))


def _identity(image, level, sign):
  return image


def _auto_contrast(image, level, sign):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.clip_by_value((image - offset) * scale, 0.0, 255.0)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize of one `(H, W)` float channel with integer values."""
  values = tf.cast(channel, tf.int32)
  hist = tf.histogram_fixed_width(values, [0, 255], nbins=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
  step = (tf.reduce_sum(hist) - last) // 255

  def equalized():
    lut = (tf.cumsum(hist) + step // 2) // step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, values), tf.float32)

  return tf.cond(step > 0, equalized, lambda: channel)


def _equalize(image, level, sign):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _solarize(image, level, sign):
  threshold = 256.0 - level * 256.0
  return tf.where(image >= threshold, 255.0 - image, image)


def _posterize(image, level, sign):
  bits = 8 - tf.cast(level * 4.0, tf.int32)
  shift = tf.cast(8 - bits, tf.uint8)
  pixels = tf.cast(image, tf.uint8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _color(image, level, sign):
  return _blend(image, _grey(image), 1.0 + sign * level * 0.9)


def _contrast(image, level, sign):
  mean = tf.reduce_mean(tf.floor(tf.image.rgb_to_grayscale(image) + 0.5))
  return _blend(image, tf.fill(tf.shape(image), mean), 1.0 + sign * level * 0.9)


def _brightness(image, level, sign):
  return _blend(image, tf.zeros_like(image), 1.0 + sign * level * 0.9)


def _sharpness(image, level, sign):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  # PIL keeps the border pixels; images smaller than 3x3 are left as they are.
  padded = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.cond(tf.reduce_all(tf.shape(image)[:2] >= 3),
                       lambda: tf.where(interior, padded, image), lambda: image)
  return _blend(image, degenerate, 1.0 + sign * level * 0.9)


OPS = (
    ('identity', _identity), ('auto_contrast', _auto_contrast), ('equalize', _equalize),
    ('rotate', _rotate), ('solarize', _solarize), ('color', _color),
    ('posterize', _posterize), ('contrast', _contrast), ('brightness', _brightness),
    ('sharpness', _sharpness), ('shear_x', _shear_x), ('shear_y', _shear_y),
    ('translate_x', _translate_x), ('translate_y', _translate_y),
)


def apply_op(image: tf.Tensor, name: str, magnitude: float, sign: float = 1.0) -> tf.Tensor:
  """One named operation at magnitude M in [0, 10] on a uint8 image; returns uint8."""
  fn = dict(OPS)[name]
  out = fn(tf.cast(image, tf.float32), tf.constant(magnitude / 10.0, tf.float32),
           tf.constant(sign, tf.float32))
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2,
                magnitude: float = 9.0) -> tf.Tensor:
  """`num_ops` random operations at magnitude M on `(H, W, 3)` uint8; returns uint8, same shape.

  Args:
    image: `(H, W, 3)` uint8.
    seed: `(2,)` int stateless seed.
    num_ops: N, operations applied in sequence.
    magnitude: M in [0, 10].
  """
  if not 0.0 <= magnitude <= 10.0:
    raise ValueError(f'randaugment magnitude must be in [0, 10], got {magnitude}')
  level = tf.constant(magnitude / 10.0, tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, num=max(num_ops, 1))

  def one_op(i, x):
    draws = tf.random.stateless_uniform([2], seed=seeds[i])
    op = tf.minimum(tf.cast(draws[0] * len(OPS), tf.int32), len(OPS) - 1)
    sign = tf.where(draws[1] < 0.5, -1.0, 1.0)
    branches = [lambda fn=fn: fn(x, level, sign) for _, fn in OPS]
    x = tf.round(tf.clip_by_value(tf.switch_case(op, branches), 0.0, 255.0))
    return i + 1, tf.ensure_shape(x, [None, None, 3])

  # A loop rather than N copies of the 14-way switch: traced once, whatever N.
  _, x = tf.while_loop(lambda i, x: i < num_ops, one_op, (0, tf.cast(image, tf.float32)),
                       shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None, 3])))
  return tf.cast(x, tf.uint8)
