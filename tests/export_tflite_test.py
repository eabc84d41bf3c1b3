"""jax2tf -> TFLite export machinery on small models: precisions, parity, failures, atomicity."""

import collections
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.export_models import TinyCNN, TinyGelu, init_calibrated, leaf_images

from kdflax.export import flatbuffer, flatbuffer_edits, inventory, isolated, lowering, tflite
from kdflax.export.interpreter import TFLiteClassifier, labels_path, read_model_metadata
from kdflax.export.model_metadata import read_standard_metadata
from kdflax.export.parity import compare_logits

SIZE = 32
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')


@pytest.fixture(scope='module')
def photos():
  return leaf_images(SIZE, 'val', per_class=8)  # 24 real photos


@pytest.fixture(scope='module')
def cnn(photos):
  module = TinyCNN(num_classes=3)
  return module, init_calibrated(module, SIZE, leaf_images(SIZE, 'train', per_class=4))


def _dir_listing(path):
  return sorted(os.listdir(path))


@pytest.mark.parametrize('precision', ['fp32', 'fp16', 'int8'])
def test_export_passes_parity_and_describes_itself(tmp_path, cnn, photos, precision):
  module, variables = cnn
  out = tmp_path / f'tiny_{precision}.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, precision,
                                calibration_images=photos, labels=LABELS, model_name='tiny')
  assert result.parity.passed and result.parity.num_images == len(photos)
  assert _dir_listing(tmp_path) == sorted([out.name, f'tiny_{precision}.labels.txt'])

  content = out.read_bytes()
  assert inventory.non_builtin_ops(content) == []
  ops = inventory.op_names(content)
  if precision == 'int8':
    # Full integer up to the logits; only their DEQUANTIZE and a float SOFTMAX (probabilities
    # without int8 1/256 steps, on XNNPACK) follow.
    assert 'HARD_SWISH' not in ops  # lowered to ops XNNPACK runs quantized
    assert ops[-2:] == ['DEQUANTIZE', 'SOFTMAX'] and ops.count('SOFTMAX') == 1
    assert inventory.tensor_types(content).get('INT8', 0) > 10
  else:
    assert ops.count('HARD_SWISH') == 2
  if precision == 'fp16':
    assert 'DEQUANTIZE' in ops and inventory.tensor_types(content).get('FLOAT16', 0) > 0

  meta = read_model_metadata(content)
  assert meta['labels'] == list(LABELS) and meta['precision'] == precision
  assert meta['input']['dtype'] == 'uint8' and meta['input']['shape'] == [1, SIZE, SIZE, 3]
  assert meta['output']['kind'] == 'probabilities'
  assert open(labels_path(out)).read().split() == list(LABELS)
  standard = read_standard_metadata(content)  # what MediaPipe & co. read
  assert standard.labels == LABELS and standard.name == 'tiny' and standard.version
  assert standard.input_mean == () and standard.output_name == 'probabilities'

  clf = TFLiteClassifier(out)
  assert clf.labels == LABELS and clf.input_dtype == np.uint8
  assert clf.output_kind == 'probabilities'
  assert clf.interpreter.get_signature_list() == {
      'serving_default': {'inputs': ['image'], 'outputs': ['probabilities']}}
  # Independent check of the result the export reported: JAX on the same uint8 pixels.
  logits = np.asarray(module.apply(variables, photos.astype(np.float32) / 255.0))
  want = np.asarray(jax.nn.softmax(logits, axis=-1))
  got = clf(photos)
  if precision == 'fp32':
    np.testing.assert_allclose(got, want, atol=1e-4)
  elif precision == 'fp16':
    np.testing.assert_allclose(got, want, atol=2e-2)
  else:
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    assert np.abs(got - want).max() < 0.25
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  if precision != 'int8':
    assert ops[-1] == 'SOFTMAX'  # the converter's own, from jax.nn.softmax


def test_logits_are_not_degenerate(cnn, photos):
  """The parity checks above mean something only if logits vary with the image."""
  module, variables = cnn
  logits = np.asarray(module.apply(variables, photos.astype(np.float32) / 255.0))
  assert logits.std(axis=0).min() > 1e-2
  assert 0.1 < np.abs(logits).max() < 100


def test_batch_and_float_input(tmp_path, cnn, photos):
  module, variables = cnn
  out = tmp_path / 'b4.tflite'
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp32', parity_images=photos[:6],
                                batch=4, input_type='float32', output='logits')
  assert result.parity.passed and result.parity.num_images == 6 and result.output == 'logits'
  clf = TFLiteClassifier(out)
  assert (clf.batch, clf.input_dtype, clf.output_kind) == (4, np.float32, 'logits')
  assert clf.interpreter.get_signature_list()['serving_default']['outputs'] == ['logits']
  standard = read_standard_metadata(out.read_bytes())
  assert (standard.input_mean, standard.input_std) == ((0.0,), (255.0,))  # float 0..1 input
  assert clf.labels == () and not os.path.exists(labels_path(out))
  want = np.asarray(module.apply(variables, photos[:5].astype(np.float32) / 255.0))
  np.testing.assert_allclose(clf(photos[:5]), want, atol=1e-4)  # padded last batch


def test_int8_with_erf_gelu_is_refused_and_leaves_no_file(tmp_path, photos):
  module = TinyGelu()
  variables = module.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  out = tmp_path / 'gelu.tflite'
  with pytest.raises(tflite.ExportError, match=r'int8 .*erfc? \(exact GELU\)'):
    tflite.export_tflite(module, variables, SIZE, out, 'int8', calibration_images=photos)
  assert _dir_listing(tmp_path) == []
  # The same model is fine in float.
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp16', calibration_images=photos)
  assert result.parity.passed and out.exists()


def test_interpreter_abort_becomes_an_error(tmp_path, photos):
  """Bypassing the up-front check, the int8 erf graph aborts LiteRT: only the child dies."""
  module = TinyGelu()
  variables = module.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  fn = tflite.serving_function(module, variables)
  path = tmp_path / 'gelu_int8.tflite'
  path.write_bytes(tflite.convert(fn, SIZE, 'int8', calibration_images=photos))
  with pytest.raises(isolated.InterpreterCrash, match='crashed \\(SIG'):
    isolated.run_isolated(path, photos[:2])


def test_unsupported_op_is_a_clear_error(tmp_path):
  fn = lambda x: np.float32(1) * __import__('jax').numpy.sort(  # noqa: E731
      x.astype('float32').reshape(x.shape[0], -1), axis=-1)[:, :3]
  with pytest.raises(tflite.ExportError, match='sort.*no TFLite builtin'):
    tflite.convert(fn, 8, 'fp32')


def test_non_builtin_ops_are_detected(tmp_path, cnn):
  """A Flex op in the flatbuffer is found by the op scan that guards every export."""
  from ai_edge_litert import schema_py_generated as schema
  from ai_edge_litert.tools import flatbuffer_utils
  module, variables = cnn
  content = tflite.convert(tflite.serving_function(module, variables), SIZE, 'fp32')
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
  code = obj.operatorCodes[0]
  code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
  code.customCode = 'FlexErf'
  tampered = bytes(flatbuffer_utils.convert_object_to_bytearray(obj))
  assert inventory.non_builtin_ops(content) == []
  assert inventory.non_builtin_ops(tampered) == ['CUSTOM:FlexErf']


def test_failed_parity_leaves_the_old_file_and_no_temp(tmp_path, cnn, photos, monkeypatch):
  module, variables = cnn
  out = tmp_path / 'model.tflite'
  out.write_bytes(b'previous export')
  # Force a wrong answer from the interpreter: parity must fail, nothing must be written.
  monkeypatch.setattr(tflite, 'run_isolated', lambda path, images: np.zeros((len(images), 3)))
  with pytest.raises(tflite.ExportError, match='fp32 parity FAILED'):
    tflite.export_tflite(module, variables, SIZE, out, 'fp32', calibration_images=photos)
  assert out.read_bytes() == b'previous export'
  assert _dir_listing(tmp_path) == ['model.tflite']
  # With allow_mismatch it is written, and the caller hears about the mismatch.
  seen = []
  result = tflite.export_tflite(module, variables, SIZE, out, 'fp32', calibration_images=photos,
                                allow_mismatch=True, on_mismatch=seen.append)
  assert not result.parity.passed and seen == [result.parity]
  assert out.read_bytes()[4:8] == b'TFL3'


def test_crash_during_write_leaves_no_partial_file(tmp_path, cnn, photos, monkeypatch):
  module, variables = cnn
  out = tmp_path / 'model.tflite'

  def crash(path, images):
    assert os.path.getsize(path) > 0  # the temp file was complete when the check ran
    raise isolated.InterpreterCrash(f'{path}: the LiteRT interpreter crashed (SIGSEGV)')

  monkeypatch.setattr(tflite, 'run_isolated', crash)
  with pytest.raises(tflite.ExportError, match='does not run in LiteRT.*SIGSEGV'):
    tflite.export_tflite(module, variables, SIZE, out, 'fp16', calibration_images=photos)
  assert _dir_listing(tmp_path) == []


def test_int8_needs_real_calibration_images(tmp_path, cnn):
  module, variables = cnn
  with pytest.raises(tflite.ExportError, match='calibration'):
    tflite.export_tflite(module, variables, SIZE, tmp_path / 'm.tflite', 'int8')
  with pytest.raises(ValueError, match='2 labels for a model with 3 classes'):
    tflite.export_tflite(module, variables, SIZE, tmp_path / 'm.tflite', labels=('a', 'b'))
  assert _dir_listing(tmp_path) == []


def test_rewrites_keep_the_function(cnn, photos):
  module, variables = cnn
  fn = tflite.serving_function(module, variables)
  spec = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), np.uint8)
  names = ('hard_silu', 'hard_swish')
  want = np.asarray(jax.jit(fn)(photos[:4]))
  for precision in ('fp32', 'int8'):
    rewritten = lowering.for_precision(fn, precision)
    got = np.asarray(jax.jit(rewritten)(photos[:4]))
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=precision)
    calls = lowering.count_calls(rewritten, spec, names)
    assert calls == (2 if precision == 'fp32' else 0), precision  # kept whole only in float


def test_lazy_scales_fold_into_weights():
  """x/255, (x - mean)/std, the mean's 1/(H*W) and hard-sigmoid's 1/6 leave no multiply."""
  w1 = np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype(np.float32)
  w2 = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
  w3 = np.random.default_rng(3).normal(size=(1, 1, 8, 8)).astype(np.float32)
  mean, std = np.asarray([0.5, 0.4, 0.3], np.float32), np.asarray([0.2, 0.25, 0.3], np.float32)

  def fn(img):
    x = (img.astype(np.float32) / 255.0 - mean) / std
    x = jax.lax.conv_general_dilated(x, w1, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    s = jax.lax.conv_general_dilated(x.mean(axis=(1, 2), keepdims=True), w3, (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    x = x * jax.nn.hard_sigmoid(s)  # squeeze-excite
    return jnp.mean(x, axis=(1, 2)) @ w2

  img = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  rewritten = lowering.for_precision(fn, 'fp32')
  np.testing.assert_allclose(np.asarray(jax.jit(rewritten)(img)), np.asarray(jax.jit(fn)(img)),
                             rtol=1e-5, atol=1e-5)
  prims = collections.Counter(e.primitive.name for e in jax.make_jaxpr(rewritten)(img).jaxpr.eqns)
  assert prims['div'] == 0
  # The only multiply left is the SE gate (x * s): no multiplication by a constant.
  eqns = [e for e in jax.make_jaxpr(rewritten)(img).jaxpr.eqns if e.primitive.name == 'mul']
  assert len(eqns) == 1
  assert all(not isinstance(v, jax.extend.core.Literal) for v in eqns[0].invars)
  # The per-channel `x - mean` runs on the (B, H, W*3) view.
  assert any(e.primitive.name == 'sub' and e.outvars[0].aval.shape == (2, 16, 48)
             for e in jax.make_jaxpr(rewritten)(img).jaxpr.eqns)


def test_int8_graph_runs_in_one_xnnpack_partition(tmp_path, cnn, photos):
  module, variables = cnn
  out = tmp_path / 'm.tflite'
  tflite.export_tflite(module, variables, SIZE, out, 'int8', calibration_images=photos)
  assert TFLiteClassifier(out).delegate_partitions == 1
  plain = tflite.convert(tflite.serving_function(module, variables), SIZE, 'int8',
                         calibration_images=photos)
  (tmp_path / 'plain.tflite').write_bytes(plain)  # without the rewrites: HARD_SWISH splits it
  assert 'HARD_SWISH' in inventory.op_names(plain)
  assert TFLiteClassifier(tmp_path / 'plain.tflite').delegate_partitions > 1


def test_parity_criteria():
  rng = np.random.default_rng(0)
  ref = rng.normal(size=(50, 4)) * 3
  assert compare_logits('fp32', ref + 5e-5, ref).passed
  assert not compare_logits('fp32', ref + 1e-3, ref).passed
  # Float tolerances scale with the logits once they exceed 1.
  assert compare_logits('fp16', ref * 100 + 0.5, ref * 100).passed
  tol = 2e-2 * np.abs(ref).max()  # ~0.17
  assert compare_logits('fp16', ref + 0.9 * tol, ref).passed
  assert not compare_logits('fp16', ref + 1.1 * tol, ref).passed
  flipped = ref.copy()
  flipped[0] = -flipped[0]  # 1 of 50 top-1 changes: 98% agreement passes, 2 fail
  assert compare_logits('int8', flipped, ref).passed
  flipped[1] = -flipped[1]
  result = compare_logits('int8', flipped, ref)
  assert not result.passed and result.top1_agreement == 0.96
  assert 'FAILED' in result.summary() and '96.0%' in result.summary()
  bad = ref.copy()
  bad[3, 2] = np.nan
  assert not compare_logits('fp32', bad, ref).passed


def test_metadata_round_trip_and_replace(cnn):
  module, variables = cnn
  content = tflite.convert(tflite.serving_function(module, variables), SIZE, 'fp32')
  once = flatbuffer_edits.add_metadata(content, 'kdflax', json.dumps({'labels': ['x']}).encode())
  twice = flatbuffer_edits.add_metadata(once, 'kdflax', b'{"labels": ["y", "z"]}')
  assert flatbuffer.read_metadata(content, 'kdflax') is None
  assert json.loads(flatbuffer.read_metadata(twice, 'kdflax')) == {'labels': ['y', 'z']}
  assert inventory.op_names(twice) == inventory.op_names(content)
  # The other metadata the converter wrote survives.
  assert flatbuffer.read_metadata(twice, 'min_runtime_version') is not None


def test_calibrated_batch_stats_are_the_batch_statistics(photos):
  """After calibration, eval mode (running stats) computes what train mode (batch stats) does."""
  from kdflax.export.stand_in import calibrate_batch_stats
  module = TinyCNN(num_classes=3)
  variables = module.init(jax.random.key(1), np.zeros((1, SIZE, SIZE, 3), np.float32))
  x = photos.astype(np.float32) / 255.0
  train, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
  before = module.apply(variables, x)
  calibrated = calibrate_batch_stats(module, variables, photos)
  after = module.apply(calibrated, x)
  assert np.abs(np.asarray(before) - np.asarray(train)).max() > 0.1
  np.testing.assert_allclose(np.asarray(after), np.asarray(train), rtol=1e-4, atol=1e-4)
  assert jax.tree.structure(calibrated) == jax.tree.structure(dict(variables))


def test_benchmark_over_several_processes_keeps_models_apart(tmp_path, cnn, photos):
  module, variables = cnn
  small = tmp_path / 'b1.tflite'
  big = tmp_path / 'b8.tflite'
  tflite.export_tflite(module, variables, SIZE, small, 'fp32', parity_images=photos[:8])
  tflite.export_tflite(module, variables, SIZE, big, 'fp32', parity_images=photos[:8], batch=8)
  stats = isolated.benchmark_isolated([small, big], warmup=1, runs=3, trials=5, processes=3)
  for s, path, batch in zip(stats, (small, big), (1, 8), strict=True):
    assert s['model'] == str(path) and s['batch'] == batch  # shuffled load order mapped back
    assert len(s['trial_median_ms']) == 5 and len(s['latency_ms']) == 15
    assert s['median_ms'] == pytest.approx(float(np.median(s['latency_ms'])))
  # Batch 8 does 8x the work of batch 1: paired per-trial ratios see it in every process.
  ratios = np.asarray(stats[1]['trial_cpu_median_ms']) / np.asarray(stats[0]['trial_cpu_median_ms'])
  assert np.median(ratios) > 2


@pytest.mark.parametrize('precision', ['fp32', 'int8'])
def test_uint8_input_is_dequantized_not_cast(tmp_path, cnn, photos, precision):
  """The input's uint8 -> float CAST (LiteRT's scalar kernel) becomes an exact DEQUANTIZE."""
  module, variables = cnn
  plain = tflite.convert(lowering.for_precision(tflite.serving_function(module, variables),
                                                precision), SIZE, precision,
                         calibration_images=photos)
  assert inventory.op_names(plain)[0] == 'CAST'
  fast = flatbuffer_edits.dequantize_uint8_inputs(plain)
  assert inventory.op_names(fast)[0] == 'DEQUANTIZE' and 'CAST' not in inventory.op_names(fast)
  assert flatbuffer_edits.dequantize_uint8_inputs(fast) == fast  # nothing left to rewrite
  (tmp_path / 'plain.tflite').write_bytes(plain)
  (tmp_path / 'fast.tflite').write_bytes(fast)
  np.testing.assert_array_equal(isolated.run_isolated(tmp_path / 'fast.tflite', photos),
                                isolated.run_isolated(tmp_path / 'plain.tflite', photos))
  out = tmp_path / 'm.tflite'
  tflite.export_tflite(module, variables, SIZE, out, precision, calibration_images=photos)
  clf = TFLiteClassifier(out)
  assert clf.input_dtype == np.uint8 and clf._input['quantization'] == (1.0, 0)
  assert inventory.op_names(out.read_bytes())[0] == 'DEQUANTIZE'
  assert clf.delegate_partitions == 1
