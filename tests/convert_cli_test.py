"""`kdflax convert` and the file-level errors of `load_timm_checkpoint`."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers.timm_reference import timm_reference

from kdflax.convert.timm import CheckpointError, load_state_dict, load_timm_checkpoint
from kdflax.models import create_model
from kdflax.train.checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'mobilenetv3_small_050'


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  return timm_reference(tmp_path_factory.mktemp('timm'), NAME, num_classes=3, image_size=64,
                        batch=1, calibrate_bn=True)


def convert(*args):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'kdflax.cli', 'convert', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def test_convert_writes_a_model_dir_that_reproduces_timm(reference, tmp_path):
  labels = tmp_path / 'labels.txt'
  labels.write_text('angular_leaf_spot\nbean_rust\nhealthy\n')
  out = tmp_path / 'model'
  proc = convert('--model', NAME, '--checkpoint', str(reference.pth_checkpoint),
                 '--out', str(out), '--labels', str(labels))
  assert proc.returncode == 0, proc.stderr
  info, variables = load_model(out)
  assert (info.model, info.num_classes, info.image_size) == (NAME, 3, 224)
  assert info.labels == ('angular_leaf_spot', 'bean_rust', 'healthy')
  module, _ = create_model(NAME, 3)
  logits = module.apply(variables, reference.image)
  # 1e-4 of the logits' scale: a random net whose BatchNorm statistics come from one 64 px
  # image reaches logits of ~20, where float32 convolution order (XLA vs PyTorch, and the
  # CPU's vector width) alone moves them by up to 5.3e-4 (measured on an Intel Xeon). Parity
  # proper is mobilenetv3_convert_test; this test's exact check is the array equality below.
  scale = max(1.0, float(np.abs(reference.logits).max()))
  np.testing.assert_allclose(logits, reference.logits, rtol=0, atol=1e-4 * scale)
  direct = load_timm_checkpoint(NAME, reference.checkpoint)
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_convert_errors_are_one_line_and_write_nothing(reference, tmp_path):
  not_a_checkpoint = tmp_path / 'notes.pth'
  not_a_checkpoint.write_text('these are field notes, not weights')
  cases = {
      'no such checkpoint file': str(tmp_path / 'missing.safetensors'),
      'not a PyTorch checkpoint': str(not_a_checkpoint),
      'it looks like a mobilenetv3 checkpoint': str(reference.checkpoint),
  }
  for message, path in cases.items():
    model = 'swin_test_patch4_window4_64' if 'looks like' in message else NAME
    out = tmp_path / f'out_{len(message)}'
    proc = convert('--model', model, '--checkpoint', path, '--out', str(out))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_file_level_errors(tmp_path, reference):
  bad_safetensors = tmp_path / 'x.safetensors'
  bad_safetensors.write_bytes(b'\x00\x01garbage')
  with pytest.raises(CheckpointError, match='not a readable .safetensors'):
    load_state_dict(bad_safetensors)
  unknown = tmp_path / 'weights.h5'
  unknown.write_bytes(b'HDF')
  with pytest.raises(CheckpointError, match='unknown checkpoint format'):
    load_state_dict(unknown)
  # A wrapped checkpoint ({'state_dict': ...}, DataParallel 'module.' prefixes) unwraps.
  import torch
  state = torch.load(reference.pth_checkpoint, weights_only=True)
  wrapped = tmp_path / 'wrapped.pth'
  torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in state.items()}}, wrapped)
  assert sorted(load_state_dict(wrapped)) == sorted(state)
  with pytest.raises(CheckpointError, match=r'does not fit .* wrong shape'):
    load_timm_checkpoint('mobilenetv3_small_100', reference.checkpoint)
