"""`kdflax eval`, `kdflax info` and the dispatcher, run as a user runs them."""

import json
import os
import subprocess
import sys

import numpy as np

from kdflax.config import load_config
from kdflax.models import create_model
from kdflax.models.init import init_variables
from kdflax.train.checkpoint import save_model
from kdflax.train.loop import evaluate
from kdflax.train.step import data_mesh, make_eval_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu'}


def kdflax(*args):
  return subprocess.run([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)


def test_eval_reports_the_same_accuracy_as_the_loop(tmp_path):
  module, size = create_model('vit_test_patch8_32', 3)
  variables = init_variables(module, 3, size)
  model_dir = save_model(tmp_path / 'model', variables, 'vit_test_patch8_32', 3, size,
                         ['angular_leaf_spot', 'bean_rust', 'healthy'])
  proc = kdflax('eval', '--model', model_dir, '--config', CONFIG)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['count'] == 45 and result['split'] == 'val'

  from kdflax.data.pipeline import make_datasets
  data = make_datasets(load_config(CONFIG).data, image_size=size)
  mesh = data_mesh()
  expected = evaluate(make_eval_step(module, mesh), variables, data.eval(), mesh)
  assert result['top1'] == expected['top1'] and np.isclose(result['loss'], expected['loss'])

  bad = kdflax('eval', '--model', str(tmp_path / 'nowhere'), '--config', CONFIG)
  assert bad.returncode == 2 and 'neither a model directory' in bad.stderr


def test_info_lists_params_macs_and_sown_maps():
  proc = kdflax('info', 'mobilenetv3_small_100', 'swin_test_patch4_window4_64')
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
  assert '2,542,856' in rows['mobilenetv3_small_100']        # timm's count at 1000 classes
  assert 'stage3[7, 7, 576]' in rows['mobilenetv3_small_100']
  assert '4 window-attention maps' in rows['swin_test_patch4_window4_64']


def test_unknown_command_and_help():
  proc = kdflax('train-everything')
  assert proc.returncode == 2 and "unknown command 'train-everything'" in proc.stderr
  assert 'distill' in kdflax('--help').stdout


def test_unknown_model_is_one_line():
  proc = kdflax('info', 'resnet50')
  assert proc.returncode == 2
  assert proc.stderr.startswith("kdflax info: unknown model 'resnet50'"), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
