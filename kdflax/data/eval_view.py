"""The evaluation view: the one definition of the pixels a model is evaluated (and served) on.

NumPy only, so the training pipeline (`kdflax.data.transforms.eval_views`, through
`tf.numpy_function`), export calibration / parity / eval and `kdflax predict`
(`kdflax.export.images.load_image`) all feed a model exactly the same `(S, S, 3)` uint8 array,
and so does an app running the exported file with MediaPipe Tasks `ImageClassifier`:

    box = eval_box(h, w, size)                   # (left, top, side) in pixels of the photo
    roi = eval_roi(h, w, size)                   # the same box, normalised: MediaPipe's RectF
    view = eval_view(photo, size)                # (size, size, 3) uint8

The view is the centre square of the photo whose side is `short * S / max(S, floor(S /
crop_fraction))` (`short` the photo's short side; with the default 0.875 that is the centre
87.5% at 224 px, 87.7% at 64 px: the same box as "short side to floor(S / 0.875), centre
S x S crop"), resampled to S x S the way MediaPipe does it with that box as its region of
interest (`ImageToTensorCalculator`, OpenCV `warpPerspective` with `INTER_LINEAR`): output
pixel `(x, y)` samples the photo at `(left + x * side / S, top + y * side / S)` (pixel
corners map to pixel corners; sample positions rounded to 1/32 pixel), bilinear between the
4 nearest pixels in OpenCV's integer arithmetic (weights in 1/32 steps, exact sums, rounded
half up), border pixels repeated. Measured against MediaPipe 1.2.3 (`ImageClassifier` with
`eval_roi`, pixels read back through an identity model): bit-identical on real photos,
square and not. No antialiasing: a photo much larger than the box's S x S is sampled, not
averaged, exactly as on the phone.
"""

from __future__ import annotations

import math

import numpy as np

# Evaluation crop of the training pipeline (config.data.eval_crop_fraction).
CROP_FRACTION = 0.875
# OpenCV's warp (MediaPipe's CPU resize) quantises sample positions to 1/32 pixel
# (INTER_BITS = 5) and bilinear weights to multiples of 1/1024.
_SUBPIXEL = 32


def eval_box(height: int, width: int, size: int, crop_fraction: float = CROP_FRACTION
             ) -> tuple[float, float, float]:
  """`(left, top, side)` in pixels of a `height x width` photo: the square the view shows."""
  if height < 1 or width < 1:
    raise ValueError(f'empty image ({height} x {width})')
  short = max(size, math.floor(size / crop_fraction))
  side = min(height, width) * size / short
  return (width - side) / 2, (height - side) / 2, side


def eval_roi(height: int, width: int, size: int, crop_fraction: float = CROP_FRACTION
             ) -> tuple[float, float, float, float]:
  """The view's box normalised to the photo: `(left, top, right, bottom)` in [0, 1].

  This is the region of interest to hand MediaPipe (`RectF(left=, top=, right=, bottom=)`)
  so that its `ImageClassifier` sees the same pixels as `eval_view`.
  """
  left, top, side = eval_box(height, width, size, crop_fraction)
  return left / width, top / height, (left + side) / width, (top + side) / height


def _axis(start: float, side: float, size: int, n: int) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
  """Source indices `(i0, i1)` and the weight of `i1` in 1/32 (0..31) for `size` samples
  along an axis of `n` pixels."""
  pos = start + np.arange(size, dtype=np.float64) * (side / size)
  q = np.round(pos * _SUBPIXEL).astype(np.int64)  # to nearest 1/32, ties to even (lrint)
  i0 = np.floor_divide(q, _SUBPIXEL)
  frac = q - i0 * _SUBPIXEL
  return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), frac


def eval_view(image: np.ndarray, size: int, crop_fraction: float = CROP_FRACTION) -> np.ndarray:
  """`(H, W, 3)` uint8 photo -> `(size, size, 3)` uint8, the view every evaluation uses.

  See the module docstring for the geometry. The arithmetic is OpenCV's 8-bit bilinear
  remap (MediaPipe's CPU path): weights in 1/32 steps, products summed exactly in integers,
  rounded half up.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f'expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}')
  h, w = image.shape[:2]
  left, top, side = eval_box(h, w, size, crop_fraction)
  y0, y1, fy = _axis(top, side, size, h)
  x0, x1, fx = _axis(left, side, size, w)
  rows0 = image[y0].astype(np.int32)  # (S, W, 3)
  rows1 = image[y1].astype(np.int32)
  fx = fx[None, :, None].astype(np.int32)
  top_row = rows0[:, x0] * (_SUBPIXEL - fx) + rows0[:, x1] * fx  # (S, S, 3), x 32
  bottom_row = rows1[:, x0] * (_SUBPIXEL - fx) + rows1[:, x1] * fx
  fy = fy[:, None, None].astype(np.int32)
  total = top_row * (_SUBPIXEL - fy) + bottom_row * fy  # x 1024
  half = _SUBPIXEL * _SUBPIXEL // 2
  return ((total + half) // (_SUBPIXEL * _SUBPIXEL)).astype(np.uint8)
