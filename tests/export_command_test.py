"""`kdflax export` end to end: several precisions, the report beside the files, usage errors."""

import json
import os

import jax
import numpy as np
import pytest
from helpers.export_models import BEANS

from kdflax import cli
from kdflax.commands import export
from kdflax.export import inventory
from kdflax.export.interpreter import TFLiteClassifier
from kdflax.export.model_metadata import read_standard_metadata
from kdflax.models import create_model
from kdflax.models.complexity import count_macs, count_params

LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')


def test_fresh_weights_two_precisions_with_report(tmp_path, capsys):
  out = tmp_path / 'student.tflite'
  code = cli.main(['export', '--model', 'mobilenetv3_small_050', '--num_classes', '3',
                   '--labels', ','.join(LABELS), '--image_size', '64', '--out', str(out),
                   '--precision', 'fp32', 'int8', '--calibration', str(BEANS / 'train'),
                   '--num_calibration', '12', '--eval', str(BEANS / 'val'), '--num_eval', '9',
                   '--runs', '3', '--allow-mismatch'])
  stdout = capsys.readouterr().out
  assert code == 0, stdout
  files = sorted(os.listdir(tmp_path))
  assert files == sorted(['student_fp32.tflite', 'student_fp32.labels.txt', 'student_int8.tflite',
                          'student_int8.labels.txt', 'student.report.json', 'student.report.md'])
  report = json.loads((tmp_path / 'student.report.json').read_text())
  module, _ = create_model('mobilenetv3_small_050', num_classes=3)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), np.zeros((1, 64, 64, 3))))
  assert report['params'] == count_params(abstract)
  assert report['macs'] == count_macs(module, abstract, 64)
  assert report['labels'] == list(LABELS) and report['eval_images'] == 9
  assert report['output'] == 'probabilities'  # the default
  by_precision = {e['precision']: e for e in report['exports']}
  assert set(by_precision) == {'fp32', 'int8'}
  for precision, entry in by_precision.items():
    path = tmp_path / f'student_{precision}.tflite'
    assert entry['size_mb'] == os.path.getsize(path) / 1e6
    assert TFLiteClassifier(path).labels == LABELS
    for threads in ('threads_1', 'threads_4'):
      lat = entry['latency'][threads]
      assert 0 < lat['median_ms'] <= lat['p90_ms'] < 1000
    # The interpreter process's own peak (not inherited from this big JAX process).
    assert 10 < entry['rss_before_mb'] < entry['peak_rss_mb'] < entry['rss_before_mb'] + 300
    assert entry['accuracy'] in {i / 9 for i in range(10)}
  # fp32 computes what JAX computes: same predictions, so the same accuracy.
  assert by_precision['fp32']['parity']['passed']
  assert by_precision['fp32']['accuracy'] == report['jax_accuracy']
  assert by_precision['int8']['size_mb'] < 0.4 * by_precision['fp32']['size_mb']
  md = (tmp_path / 'student.report.md').read_text()
  assert md.count('| fp32 |') == 1 and md.count('| int8 |') == 1
  assert 'student_int8.tflite' in stdout and 'report:' in stdout


def test_output_logits_on_request(tmp_path, capsys):
  out = tmp_path / 'logits.tflite'
  code = cli.main(['export', '--model', 'mobilenetv3_small_050', '--num_classes', '3',
                   '--labels', ','.join(LABELS), '--image_size', '32', '--out', str(out),
                   '--output', 'logits', '--no-report'])
  assert code == 0, capsys.readouterr().err
  clf = TFLiteClassifier(out)
  assert clf.output_kind == 'logits' and clf.labels == LABELS
  assert clf.interpreter.get_signature_list()['serving_default']['outputs'] == ['logits']
  assert 'SOFTMAX' not in inventory.op_names(out.read_bytes())
  standard = read_standard_metadata(out.read_bytes())
  assert standard.output_name == 'logits' and standard.labels == LABELS


def test_model_directory_export_keeps_labels(tmp_path):
  from kdflax.train.checkpoint import save_model
  module, _ = create_model('mobilenetv3_small_050', num_classes=3)
  variables = module.init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))
  directory = save_model(tmp_path / 'best', variables, 'mobilenetv3_small_050', 3, 32,
                         labels=LABELS)
  out = tmp_path / 'phone' / 'leaf.tflite'
  assert export.main(['export', '--checkpoint', directory, '--out', str(out), '--no-report',
                      '--precision', 'fp16']) == 0
  clf = TFLiteClassifier(out)
  assert clf.labels == LABELS and clf.image_size == 32
  assert (tmp_path / 'phone' / 'leaf.labels.txt').read_text().split() == list(LABELS)
  assert not (tmp_path / 'phone' / 'leaf.report.json').exists()


@pytest.mark.parametrize('argv, message', [
    (['--model', 'mobilenetv3_small_050', '--num_classes', '3', '--out', 'x.tflite',
      '--precision', 'int8'], '--precision int8 needs --calibration'),
    (['--checkpoint', 'no/such/dir', '--out', 'x.tflite'], 'not a folder'),
    (['--out', 'x.tflite'], 'exactly one of --checkpoint'),
    (['--model', 'mobilenetv3_small_050', '--out', 'x.tflite'], '--model needs --num_classes'),
    (['--model', 'mobilenetv3_small_050', '--num_classes', '3', '--out', 'x.onnx'],
     'expected a FILE.tflite'),
])
def test_usage_errors_are_exit_2(tmp_path, capsys, monkeypatch, argv, message):
  monkeypatch.chdir(tmp_path)
  assert export.main(['export', *argv]) == 2
  assert message in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
  code = export.main(['export', '--model', 'resnet50', '--num_classes', '3',
                      '--out', str(tmp_path / 'x.tflite')])
  assert code == 1
  assert "unknown model 'resnet50'" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_int8_swin_is_refused_naming_the_op(tmp_path, capsys):
  out = tmp_path / 'swin.tflite'
  code = cli.main(['export', '--model', 'swin_test_patch4_window4_64', '--num_classes', '3',
                   '--out', str(out), '--precision', 'int8', '--calibration',
                   str(BEANS / 'val'), '--num_calibration', '4', '--no-report'])
  err = capsys.readouterr().err
  assert code == 1
  assert 'int8 export is not possible' in err and 'exact GELU' in err
  assert os.listdir(tmp_path) == []
