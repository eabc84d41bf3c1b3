"""One evaluation view: the training pipeline's eval and export / predict see the same pixels."""

import io

import numpy as np
import pytest
import tensorflow as tf
from helpers.export_models import leaf_files
from PIL import Image

from kdflax.data import eval_view as view
from kdflax.data import transforms
from kdflax.export import images

SIZES = (64, 224)


def _pipeline_view(path, size: int) -> np.ndarray:
  """What the training pipeline's eval feeds the model: tf decode, then `eval_views`."""
  image = transforms.decode(tf.io.read_file(str(path)))
  return transforms.eval_views(image, {'image': size}, 0.875)['image'].numpy()


def _export_view(path, size: int) -> np.ndarray:
  """What export calibration / parity / eval and `kdflax predict` feed it, in [0, 1]."""
  return images.load_image(path, size).astype(np.float32) / 255.0


@pytest.fixture(scope='module')
def photo_files(tmp_path_factory):
  """Real leaf photos (JPEG), plus a landscape and a portrait crop of one as JPEG and PNG."""
  files = leaf_files('val', per_class=4)
  photo = np.asarray(Image.open(files[0]).convert('RGB'))
  tmp = tmp_path_factory.mktemp('views')
  for name, arr in (('wide', photo[40:200]), ('tall', photo[:, 30:150])):
    for ext in ('jpg', 'png'):
      path = tmp / f'{name}.{ext}'
      Image.fromarray(arr).save(path, quality=92) if ext == 'jpg' else \
          Image.fromarray(arr).save(path)
      files.append(path)
  return files


@pytest.mark.parametrize('size', SIZES)
def test_pipeline_and_export_see_the_same_pixels(photo_files, size):
  for path in photo_files:
    a, b = _pipeline_view(path, size), _export_view(path, size)
    assert a.shape == b.shape == (size, size, 3) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1 / 255 + 1e-6, rtol=0, err_msg=str(path))
    assert np.mean(np.abs(a - b)) < 0.2 / 255, path  # decoders agree on almost every pixel


def test_the_pipeline_uses_the_shared_view(photo_files):
  """A decoded array through `eval_views` is `view.eval_view` exactly (no second resize)."""
  photo = np.asarray(Image.open(photo_files[-1]).convert('RGB'))
  got = transforms.eval_views(tf.constant(photo), {'image': 64, 'teacher_image': 96}, 0.875)
  for key, size in (('image', 64), ('teacher_image', 96)):
    np.testing.assert_array_equal(np.round(got[key].numpy() * 255).astype(np.uint8),
                                  view.eval_view(photo, size))


def test_view_geometry():
  # 224 / 0.875 = 256 = the short side: the view is the centre 224 x 224, pixel for pixel.
  image = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)
  np.testing.assert_array_equal(view.eval_view(image, 224), image[16:240, 48:272])
  assert view.eval_box(256, 320, 224) == (48.0, 16.0, 224.0)
  # The same box as "short side to floor(S / 0.875), centre S x S crop" at 64 px: 64/73.
  left, top, side = view.eval_box(300, 200, 64)
  assert side == pytest.approx(200 * 64 / 73) and left == pytest.approx((200 - side) / 2)
  assert top == pytest.approx((300 - side) / 2)
  assert view.eval_roi(300, 200, 64) == pytest.approx(
      (left / 200, top / 300, (left + side) / 200, (top + side) / 300))
  # A constant image stays constant; an upscaled gradient stays monotonic.
  flat = np.full((50, 70, 3), 77, np.uint8)
  np.testing.assert_array_equal(view.eval_view(flat, 64), 77)
  ramp = np.repeat(np.repeat(np.arange(0, 250, 10, dtype=np.uint8)[None, :, None], 25, 0), 3, 2)
  row = view.eval_view(ramp, 40)[20, :, 0].astype(int)
  assert np.all(np.diff(row) >= 0) and row[-1] > row[0]


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match='uint8'):
    view.eval_view(np.zeros((10, 10, 3), np.float32), 8)
  with pytest.raises(ValueError, match='empty image'):
    view.eval_box(0, 10, 8)


def test_predict_reads_files_as_the_pipeline_does(tmp_path):
  """A PNG written from an array decodes losslessly on both paths: views are identical."""
  arr = np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  path = tmp_path / 'x.png'
  path.write_bytes(buf.getvalue())
  np.testing.assert_array_equal(np.round(_pipeline_view(path, 48) * 255).astype(np.uint8),
                                images.load_image(path, 48))
