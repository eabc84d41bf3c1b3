"""The teacher-output cache: cached loss == live loss on the same view, refusals of a
mismatched cache and of mixup, an interrupted build, and the CLI end to end."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.data_fixtures import copy_beans

from kdflax.config import load_config
from kdflax.data.pipeline import make_datasets
from kdflax.data.sources import FolderSource
from kdflax.models import create_model
from kdflax.models.init import init_variables
from kdflax.train import checkpoint as model_io
from kdflax.train.stages import prepare_stage
from kdflax.train.step import TEACHER_LOGITS, TEACHER_TARGET_PREFIX, make_train_step
from kdflax.train.teacher_cache import MANIFEST, CacheError, TeacherCache
from kdflax.train.teacher_cache.build import build_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'configs', 'tiny_cache.py')
ENV = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3', 'JAX_PLATFORMS': 'cpu',
       'PYTHONUNBUFFERED': '1'}
TEACHER = 'swin_test_patch4_window4_64'
VIEWS = 2


def _config(*overrides):
  return load_config(CONFIG, [f'--config.{o}' for o in overrides])


def _save_teacher(path, seed):
  labels = FolderSource(os.path.join(ROOT, 'data', 'beans_sample')).labels
  module, size = create_model(TEACHER, len(labels))
  return model_io.save_model(path, init_variables(module, seed, size), TEACHER, len(labels),
                             size, labels)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A teacher model dir (64 px) and a complete cache of 2 views per image built from it."""
  tmp = tmp_path_factory.mktemp('cache')
  teacher_dir = _save_teacher(tmp / 'teacher', 0)
  cache_dir = str(tmp / 'cache')
  build_cache(_config(), cache_dir, teacher_dir, views=VIEWS, shard_images=32, log_fn=lambda _: 0)
  return teacher_dir, cache_dir


def _silent(_):
  pass


def test_cached_loss_terms_equal_live_teacher_terms_on_the_same_view(built):
  teacher_dir, cache_dir = built
  config = _config()
  live = prepare_stage(config, 'distill', teacher_dir, log_fn=_silent)
  # The cached stream's views, with the teacher's resolution as well, for the live teacher.
  data = make_datasets(config.data, image_size=32, teacher_image_size=64, cache_views=VIEWS)
  batch = next(data.train(0))
  assert batch['teacher_image'].shape[1:] == (64, 64, 3)
  cache = TeacherCache(cache_dir)
  looked_up = cache.lookup(batch['index'], batch['view'])
  common = {'image': batch['image'], 'label': batch['label']}

  live_step = jax.jit(make_train_step(live.module, live.teacher, live.objective.apply,
                                      live.mesh, jit=False))
  cached_step = jax.jit(make_train_step(live.module, None, live.objective.apply, live.mesh,
                                        jit=False, cached_teacher=True))
  _, live_metrics = live_step(live.state, live.teacher_variables,
                              {**common, 'teacher_image': batch['teacher_image']})
  _, cached_metrics = cached_step(live.state, None, {**common, **looked_up})
  terms = ['kd', 'attention/win', 'attention/feat', 'manifold/intra', 'manifold/inter',
           'manifold/random', 'ce', 'total', 'loss', 'grad_norm']
  for term in terms:
    np.testing.assert_allclose(cached_metrics[term], live_metrics[term], rtol=1e-5, atol=1e-6,
                               err_msg=term)
  assert float(live_metrics['attention/win']) > 0 and float(live_metrics['manifold/intra']) > 0

  # A cached distill's own stream yields these very views with these teacher outputs.
  cached = prepare_stage(_config(f'teacher.cache={cache_dir}'), 'distill', teacher_dir,
                         log_fn=_silent)
  assert cached.teacher_variables is None and cached.teacher_cache is not None
  own = next(cached.data.train(0))
  assert 'index' not in own and 'teacher_image' not in own
  np.testing.assert_array_equal(own['image'], batch['image'])
  for key, value in looked_up.items():
    np.testing.assert_array_equal(own[key], value)
  assert set(own) >= {TEACHER_LOGITS, f'{TEACHER_TARGET_PREFIX}manifold/m'}


def test_views_are_fixed_per_image_and_vary_between_views(built):
  config = _config()
  data = make_datasets(config.data, image_size=32, cache_views=VIEWS)
  b0 = next(data.train(0))
  again = next(make_datasets(config.data, image_size=32, cache_views=VIEWS).train(0))
  np.testing.assert_array_equal(b0['image'], again['image'])
  _, batches = data.fixed_views(VIEWS, 8, {'image': 32})
  first = next(batches)
  assert list(first['index'][:4]) == [0, 0, 1, 1] and list(first['view'][:4]) == [0, 1, 0, 1]
  assert not np.array_equal(first['image'][0], first['image'][1])  # two crops of one image


def _one_line(error):
  text = str(error)
  assert '\n' not in text
  return text


@pytest.mark.parametrize('what, overrides, field', [
    ('other teacher', (), 'teacher.variables_sha256'),
    ('other resolution', ('model.overrides.img_size=48',), 'student_image_size'),
    ('other pairs', ('loss.attention.pairs.win.teacher=stage2_attn',), 'targets.attention/win'),
    ('other dataset', ('data.root={small}',), 'data.num_train'),
    ('other seed', ('seed=3',), 'seed'),
])
def test_a_mismatched_cache_is_refused_in_one_line(built, tmp_path, what, overrides, field):
  teacher_dir, cache_dir = built
  if what == 'other teacher':
    teacher_dir = _save_teacher(tmp_path / 'other_teacher', 1)
  small = copy_beans(tmp_path / 'small', {'train': 4, 'val': 2})
  config = _config(f'teacher.cache={cache_dir}', *[o.format(small=small) for o in overrides])
  with pytest.raises(CacheError) as info:
    prepare_stage(config, 'distill', teacher_dir, log_fn=_silent)
  text = _one_line(info.value)
  assert f' {field} is ' in text and cache_dir in text, text


def test_the_same_photos_in_another_folder_use_the_cache(built, tmp_path):
  # What a committed cache meets in a fresh clone: the same files below another root.
  teacher_dir, cache_dir = built
  moved = tmp_path / 'moved'
  shutil.copytree(os.path.abspath(_config().data.root), moved)
  setup = prepare_stage(_config(f'teacher.cache={cache_dir}', f'data.root={moved}'), 'distill',
                        teacher_dir, log_fn=_silent)
  assert setup.teacher_cache is not None
  # ... but not when one photo of the train split differs.
  victim = sorted(glob.glob(str(moved / 'train' / '*' / '*')))[0]
  with open(victim, 'ab') as f:
    f.write(b'\0')
  with pytest.raises(CacheError) as info:
    prepare_stage(_config(f'teacher.cache={cache_dir}', f'data.root={moved}'), 'distill',
                  teacher_dir, log_fn=_silent)
  assert ' data.files_sha256 is ' in _one_line(info.value)


class Killed(Exception):
  pass


def test_an_interrupted_build_never_reads_as_complete_and_a_rerun_completes(built, tmp_path):
  teacher_dir, _ = built
  out = str(tmp_path / 'cache')

  def kill(shard):
    raise Killed(shard)

  with pytest.raises(Killed):
    build_cache(_config(), out, teacher_dir, views=VIEWS, shard_images=16, log_fn=_silent,
                after_shard=kill)
  partial = glob.glob(out + '.partial-*')
  assert len(partial) == 1 and glob.glob(os.path.join(partial[0], 'logits.00000.npy'))
  assert not os.path.exists(os.path.join(partial[0], MANIFEST)) and not os.path.exists(out)
  with pytest.raises(CacheError, match='incomplete'):
    TeacherCache(out)
  with pytest.raises(CacheError, match='incomplete'):
    prepare_stage(_config(f'teacher.cache={out}'), 'distill', teacher_dir, log_fn=_silent)

  manifest = build_cache(_config(), out, teacher_dir, views=VIEWS, shard_images=16,
                         log_fn=_silent)
  assert not glob.glob(out + '.partial-*')
  cache = TeacherCache(out)
  assert cache.num_views == VIEWS and cache.num_images == manifest['num_images']
  assert cache.shard('logits', cache.num_shards - 1).shape[1:] == (VIEWS, 3)
  assert isinstance(cache.shard('logits', 0), np.memmap)


def _kdflax(*args, timeout=600):
  return subprocess.run([sys.executable, '-m', 'kdflax.cli', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def _errors(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith('kdflax')]


def test_cli_cache_teacher_then_distill_from_the_cache(built, tmp_path):
  teacher_dir, _ = built
  out, workdir = str(tmp_path / 'cache'), str(tmp_path / 'run')
  t0 = time.perf_counter()
  proc = _kdflax('cache-teacher', '--config', CONFIG, '--teacher_workdir', teacher_dir,
                 '--out', out, '--views', '2')
  build_s = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout[proc.stdout.index('{'):])['views'] == 2
  t0 = time.perf_counter()
  proc = _kdflax('distill', '--config', CONFIG, '--workdir', workdir,
                 f'--config.teacher.cache={out}')
  distill_s = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isdir(os.path.join(workdir, 'model_final'))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if 'train/loss' in line]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['train/kd']) and r['train/attention/win'] > 0 for r in rows)
  print(f'cache-teacher CLI {build_s:.1f} s, cached distill CLI (3 steps) {distill_s:.1f} s')

  # Mixup between images cannot use the cache: one line, nothing trained.
  proc = _kdflax('distill', '--config', CONFIG, '--workdir', str(tmp_path / 'mix'),
                 f'--config.teacher.cache={out}', '--config.data.mixup_alpha=0.2')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  lines = _errors(proc)
  assert len(lines) == 1 and 'mixup' in lines[0], proc.stderr[-2000:]


def test_building_a_cache_with_mixup_or_cutmix_is_refused(built, tmp_path):
  teacher_dir, _ = built
  for override in ('data.mixup_alpha=0.4', 'data.cutmix_alpha=1.0'):
    with pytest.raises(CacheError) as info:
      build_cache(_config(override), str(tmp_path / 'c'), teacher_dir, log_fn=_silent)
    assert 'mixup' in _one_line(info.value)
  assert not os.path.exists(tmp_path / 'c')


def test_a_pipeline_with_only_a_cache_reports_the_teacher_the_cache_recorded(built):
  from kdflax.pipeline.run import cached_teacher_row
  teacher_dir, cache_dir = built
  with open(os.path.join(cache_dir, MANIFEST)) as f:
    recorded = json.load(f)['teacher_eval']
  # The build scored its teacher on the eval split, as `kdflax eval` does.
  from kdflax.train.evaluation import evaluate_model_dir
  assert recorded['top1'] == evaluate_model_dir(teacher_dir, _config())['top1']
  row = cached_teacher_row(_config(f'teacher.cache={cache_dir}'))
  assert (row['model'], row['top1']) == (TEACHER, recorded['top1']) and row['params'] > 0
  assert f'{VIEWS} views per train image' in row['detail']
