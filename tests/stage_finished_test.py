"""A finished stage run again: same config -> its stored summary, nothing rebuilt; a changed
config -> resumes from the latest checkpoint and trains on."""

import json
import os

import pytest

from kdflax.config import load_config
from kdflax.train import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')
FLAGS = ['--config.train.num_steps=2', '--config.train.eval_every=2',
         f'--config.data.root={os.path.join(ROOT, "data", "beans_sample")}']


def test_finished_stage_is_returned_not_rebuilt_until_the_config_changes(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'student')
  config = load_config(CONFIG, FLAGS)
  first = stages.run_stage(config, workdir, 'student', log_fn=lambda _: None)
  with open(os.path.join(workdir, 'results.json')) as f:
    stored = json.load(f)
  assert stored['step'] == 2 and stored['fingerprint']

  built = []
  real_prepare = stages.prepare_stage
  monkeypatch.setattr(stages, 'prepare_stage',
                      lambda *a, **k: built.append(1) or real_prepare(*a, **k))
  again = stages.run_stage(load_config(CONFIG, [*FLAGS, '--config.train.progress=False']),
                           workdir, 'student', log_fn=lambda _: None)
  assert not built  # logging settings do not change the result
  assert again == {**first, 'model_dir': first['model_dir']}

  longer = load_config(CONFIG, [*FLAGS, '--config.train.num_steps=3'])
  more = stages.run_stage(longer, workdir, 'student', log_fn=lambda _: None)
  assert built and more['step'] == 3
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert steps == [1, 2, 3]  # resumed at 2, did not start over
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line)['config']['train']['num_steps'] for line in f]
  assert history == [2, 3]  # each start's config; the returned finished run wrote none
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['num_steps'] == 3


@pytest.mark.parametrize('damage', ['no_best_model', 'other_teacher', 'corrupt_json'])
def test_anything_else_is_not_a_finished_stage(tmp_path, damage):
  workdir = tmp_path / 'w'
  (workdir / 'model_best').mkdir(parents=True)
  config = load_config(CONFIG, FLAGS)
  fingerprint = stages.stage_fingerprint(config, 'distill', 'teacher_a')
  (workdir / 'results.json').write_text(json.dumps({'final': {}, 'fingerprint': fingerprint}))
  assert stages.finished_summary(str(workdir), fingerprint) is not None
  if damage == 'no_best_model':
    (workdir / 'model_best').rmdir()
  elif damage == 'other_teacher':
    fingerprint = stages.stage_fingerprint(config, 'distill', 'teacher_b')
  else:
    (workdir / 'results.json').write_text('{"final": ')
  assert stages.finished_summary(str(workdir), fingerprint) is None
