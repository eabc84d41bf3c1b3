"""The `.tflite` files committed under `results/` (scored on held-out test splits we do not
have) are in the repository, carry their labels, and still score on val what their export
report says they scored.

Every `results/<dataset>/<name>_int8.tflite` has a `<name>_int8.report.json` written by the
export (`kdflax.export.export_model`, its `eval_source` made relative to the repository);
`results/<dataset>/results.json` names the files the results promise (`committed`). The
files are run through the LiteRT interpreter on the report's eval folder, as evaluation views
(`kdflax.data.photos.split_photos`, what the export scored), and their top-1 must equal the
report's.
"""

import glob
import json
import os

import numpy as np
import pytest

from kdflax.data.photos import split_photos, to_model_labels
from kdflax.data.sources import FolderSource
from kdflax.export.interpreter import TFLiteClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = sorted(glob.glob(os.path.join(ROOT, 'results', '*', 'results.json')))
MODELS = sorted(glob.glob(os.path.join(ROOT, 'results', '*', '*_int8.tflite')))


def _promised(path):
  with open(path) as f:
    return json.load(f).get('committed', [])


@pytest.mark.parametrize('results', RESULTS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_every_promised_model_is_committed(results):
  folder = os.path.dirname(results)
  missing = [name for name in _promised(results) if not os.path.exists(os.path.join(folder, name))]
  assert not missing, f'{results} promises {missing}, which are not in the repository'


def test_the_beans_models_the_issue_names_are_promised():
  promised = _promised(os.path.join(ROOT, 'results', 'beans', 'results.json'))
  assert {'baseline_int8.tflite', 'hybrid_int8.tflite', 'teacher_int8.tflite'} <= set(promised)


@pytest.mark.parametrize('model', MODELS, ids=lambda p: os.path.relpath(p, ROOT))
def test_a_committed_model_scores_what_its_report_says(model):
  with open(model.replace('.tflite', '.report.json')) as f:
    report = json.load(f)
  clf = TFLiteClassifier(model)
  assert tuple(clf.labels) == tuple(report['labels'])  # labels travel inside the file
  (export,) = [e for e in report['exports'] if e['precision'] == 'int8']
  root, split = report['eval_source'].rsplit(' ', 1)  # 'FOLDER SPLIT', FOLDER in the repo
  images, idx, classes = split_photos(FolderSource(os.path.join(ROOT, root)), split,
                                      report['image_size'])
  labels = to_model_labels(idx, classes, clf.labels, report['eval_source'])
  assert len(labels) == export['accuracy_images'] == report['eval_images']
  top1 = np.concatenate([clf(images[i:i + 1]) for i in range(len(images))]).argmax(-1)
  correct = int((top1 == labels).sum())
  assert correct == round(export['accuracy'] * len(labels)), (
      f'{model}: {correct}/{len(labels)} correct, its report says {export["accuracy"]:.4f}')
