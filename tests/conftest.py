"""Shared pytest set-up: quiet TensorFlow, CPU-only JAX, repository paths."""

import os
import pathlib
import shutil
import sys

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Never reach for the network (TFDS, Hugging Face hub) from a test.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('NO_GCE_CHECK', 'true')

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / 'tests'
if str(TESTS) not in sys.path:
  sys.path.insert(0, str(TESTS))


@pytest.fixture(scope='session')
def tiny_tflite(tmp_path_factory):
  """A small valid kdflax `.tflite` (TinyCNN at 32 px, fp32, labels a b c) and its bytes."""
  from helpers.export_models import TinyCNN, init_calibrated, leaf_images

  from kdflax.export import tflite
  module = TinyCNN(num_classes=3)
  variables = init_calibrated(module, 32, leaf_images(32, 'train', per_class=2))
  path = tmp_path_factory.mktemp('tiny_tflite') / 'leaf.tflite'
  tflite.export_tflite(module, variables, 32, path, 'fp32', labels=('a', 'b', 'c'))
  return path, path.read_bytes()


@pytest.fixture
def leaf_photo(tmp_path):
  """One bundled leaf photo, copied alone into `tmp_path/photos/`."""
  from helpers.export_models import leaf_files
  dest = tmp_path / 'photos' / 'leaf.jpg'
  dest.parent.mkdir()
  shutil.copy(leaf_files('val', per_class=1)[0], dest)
  return dest
