"""Simulated int8 (quantisation-aware fine-tuning): the rounding, the model, the stage."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from kdflax.models import quant
from kdflax.models.depthwise import reference_form
from kdflax.models.registry import create_model


def _numpy_kernel_quant(w):
  scale = np.abs(w).reshape(-1, w.shape[-1]).max(0) / 127.0
  return np.clip(np.round(w / scale), -127, 127) * scale


def test_kernel_rounding_is_per_output_channel_int8_with_a_straight_through_gradient():
  w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
  w[..., 2] *= 100.0   # one wide channel must not coarsen the others (per-channel scales)
  got = np.asarray(quant.fake_quant_kernel(jnp.asarray(w)))
  np.testing.assert_allclose(got, _numpy_kernel_quant(w), rtol=1e-6, atol=1e-7)
  for c in range(5):  # at most 255 distinct levels per channel, all multiples of its scale
    assert len(np.unique(got[..., c])) <= 255
  grad = jax.grad(lambda k: jnp.sum(quant.fake_quant_kernel(k) * 3.0))(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(grad), 3.0)


def test_kernel_rounding_commutes_with_a_per_channel_scale_as_batchnorm_folding_needs():
  w = np.random.default_rng(1).normal(size=(1, 1, 8, 6)).astype(np.float32)
  fold = np.array([0.5, 2.0, -3.0, 1e-2, 7.0, -0.25], np.float32)  # gamma / sqrt(var + eps)
  a = np.asarray(quant.fake_quant_kernel(jnp.asarray(w * fold)))
  b = np.asarray(quant.fake_quant_kernel(jnp.asarray(w))) * fold
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_activation_rounding_has_256_levels_an_exact_zero_and_clips_outside():
  x = jnp.linspace(-3.0, 9.0, 5001)
  y = np.asarray(quant.fake_quant_range(x, jnp.float32(-2.0), jnp.float32(6.0)))
  assert len(np.unique(y)) <= 256 and 0.0 in y
  scale = 8.0 / 255.0   # the grid moves by < 1 step so that 0 is a level (integer zero point)
  assert y.min() >= -2.0 - scale and y.max() <= 6.0 + scale
  assert np.max(np.abs(y[(x > -1.9) & (x < 5.9)] - np.asarray(x)[(x > -1.9) & (x < 5.9)])) \
      <= scale / 2 + 1e-6
  grad = np.asarray(jax.grad(lambda v: jnp.sum(quant.fake_quant_range(
      v, jnp.float32(-2.0), jnp.float32(6.0))))(x))
  assert np.all(grad[(x > -1.9) & (x < 5.9)] == 1.0) and np.all(grad[x > 6.1] == 0.0)
  # A range that excludes 0 is widened to contain it (TFLite's nudging).
  z = np.asarray(quant.fake_quant_range(jnp.array([0.0, 1.0, 2.0]), jnp.float32(1.0),
                                        jnp.float32(2.0)))
  assert z[0] == 0.0


def test_act_range_is_set_by_the_first_batch_then_follows_an_average():
  layer = quant.ActRange(decay=0.5)
  a, b = jnp.array([-1.0, 3.0]), jnp.array([-3.0, 1.0])
  variables = layer.init(jax.random.key(0), a)
  _, state = layer.apply(variables, a, update=True, mutable=['batch_stats'])
  stats = state['batch_stats']
  assert (float(stats['range_min']), float(stats['range_max'])) == (-1.0, 3.0)
  _, state = layer.apply({'batch_stats': stats}, b, update=True, mutable=['batch_stats'])
  stats = state['batch_stats']
  assert (float(stats['range_min']), float(stats['range_max'])) == (-2.0, 2.0)
  # Evaluation uses the stored range: 3.0 is clipped to 2.0.
  out = layer.apply({'batch_stats': stats}, jnp.array([3.0, 0.0]))
  assert float(out[0]) == pytest.approx(2.0, abs=4.0 / 255)


@pytest.fixture(scope='module')
def student():
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  model, _ = create_model('mobilenetv3_small_050', 3, depthwise='shifted')
  qmodel, _ = create_model('mobilenetv3_small_050', 3, depthwise='shifted', quantize=True)
  return model, qmodel, model.init(jax.random.key(0), x), qmodel.init(jax.random.key(0), x), x


def test_quantized_model_has_the_float_parameters_plus_ranges_and_exports_as_float(student):
  model, qmodel, variables, qvariables, x = student
  flat = traverse_util.flatten_dict(variables, sep='/')
  qflat = traverse_util.flatten_dict(qvariables, sep='/')
  extra = set(qflat) - set(flat)
  assert set(flat) <= set(qflat) and extra
  assert all(quant.is_range_variable(k) for k in extra)
  # The float model ignores the ranges: a QAT model directory exports like a float one.
  np.testing.assert_array_equal(model.apply(qvariables, x), model.apply(variables, x))
  assert reference_form(qmodel).quantize is False
  # Simulated int8 after one training pass (ranges set) stays close to float.
  _, state = qmodel.apply(qvariables, x, train=True, mutable=['batch_stats'],
                          rngs={'dropout': jax.random.key(2)})
  trained = {'params': qvariables['params'], 'batch_stats': state['batch_stats']}
  sim, ref = qmodel.apply(trained, x), model.apply(variables, x)
  assert not np.array_equal(sim, ref)
  assert np.abs(sim - ref).max() < 0.2 * np.abs(ref).max() + 1e-3
  # BatchNorm statistics are frozen in the quantized model's training pass.
  bn = [k for k in traverse_util.flatten_dict(state['batch_stats'], sep='/') if 'bn' in k]
  for key in bn:
    np.testing.assert_array_equal(traverse_util.flatten_dict(state['batch_stats'], sep='/')[key],
                                  qflat[f'batch_stats/{key}'])


def test_qat_config_refuses_a_student_without_simulated_int8():
  from kdflax.config import load_config
  from kdflax.pipeline.qat import qat_config
  config = load_config('tests/configs/tiny.py', ['--config.export.qat.epochs=1'])
  with pytest.raises(ValueError, match='vit_test_patch8_32 has no simulated int8'):
    qat_config(config, 'somewhere')


def test_pipeline_exports_int8_from_a_qat_fine_tune_of_the_student(tmp_path):
  from kdflax.config import load_config
  from kdflax.pipeline.run import export_student
  from kdflax.train.stages import run_stage

  config = load_config('tests/configs/tiny.py', [
      '--config.model.name=mobilenetv3_small_050', '--config.model.image_size=32',
      '--config.model.overrides.depthwise=shifted', '--config.train.num_steps=6',
      '--config.export.qat.epochs=1', '--config.export.qat.learning_rate=1e-4',
      '--config.export.precisions=("int8",)', '--config.export.calibration_images=16',
      '--config.export.eval_images=12'])
  student = run_stage(config, str(tmp_path / 'student'), 'student', log_fn=lambda _: None)
  rows = export_student(config, student['model_dir'], str(tmp_path), 'student', None,
                        log=lambda _: None)
  assert [r['stage'] for r in rows] == [
      'baseline student, int8-aware fine-tune (1 epoch, simulated int8)',
      'exported .tflite (int8)']
  info = json.load(open(tmp_path / 'qat' / 'model_best' / 'model.json'))
  assert info['overrides']['quantize'] is True
  results = json.load(open(tmp_path / 'qat' / 'results.json'))
  assert results['step'] == 15   # one epoch of the 120 bundled train photos at batch 8
  assert os.path.isfile(tmp_path / 'export' / 'mobilenetv3_small_050_int8.tflite')
