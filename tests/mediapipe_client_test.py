"""A real app-side client: MediaPipe Tasks `ImageClassifier` runs kdflax-exported files.

A MobileNetV3-Small student (64 px, trained briefly on real leaf photos) is exported at fp32
and int8; MediaPipe loads each file as is (standard metadata), classifies the real photos of
`data/beans_sample/val` with the region of interest `kdflax.data.eval_view.eval_roi` (what
docs/export.md tells an app to pass), and must return the model's category names, scores in
[0, 1] that sum to 1 over all categories, and the same top-1 as `kdflax predict` on >= 99%
of the photos. MediaPipe runs in a child process, as an app would: its native runtime stays
out of the test process (TensorFlow, JAX).
"""

import json
import platform
import subprocess
import sys

import numpy as np
import pytest
from helpers.export_models import BEANS, leaf_images, train_briefly

from kdflax.commands import predict
from kdflax.export import tflite
from kdflax.export.images import find_images
from kdflax.models import create_model

SIZE = 64
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')
PER_CLASS = 16
VAL = BEANS / 'val'

# mediapipe publishes wheels for these platforms only; anywhere else the test cannot run.
# Everywhere else a failing `import mediapipe` is a broken install and fails the test.
_WHEELS = {('linux', 'x86_64'), ('linux', 'aarch64'), ('darwin', 'arm64'),
           ('darwin', 'x86_64'), ('win32', 'AMD64')}
_PLATFORM = (sys.platform, platform.machine())
pytestmark = pytest.mark.skipif(_PLATFORM not in _WHEELS,
                                reason=f'no mediapipe wheel for {_PLATFORM}')

# The app: MediaPipe ImageClassifier with the documented region of interest.
_CLIENT = r'''
import json, sys
import numpy as np
from PIL import Image
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions, vision
from mediapipe.tasks.python.components.containers.rect import RectF
from kdflax.data.eval_view import eval_roi

model, size, num_classes, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model),
                                        max_results=num_classes)
out = []
with vision.ImageClassifier.create_from_options(options) as classifier:
  for path in files:
    pixels = np.asarray(Image.open(path).convert('RGB'))  # the app's decoded photo
    left, top, right, bottom = eval_roi(pixels.shape[0], pixels.shape[1], size)
    roi = vision.ImageProcessingOptions(
        region_of_interest=RectF(left=left, top=top, right=right, bottom=bottom))
    result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=pixels), roi)
    out.append([[c.category_name, c.index, c.score]
                for c in result.classifications[0].categories])
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """`{precision: path}` of a briefly trained MobileNetV3-Small at 64 px."""
  module, _ = create_model('mobilenetv3_small_100', num_classes=3, drop_rate=0.0)
  calib = leaf_images(SIZE, 'train', per_class=PER_CLASS)
  variables = train_briefly(module, calib, np.repeat(np.arange(3), PER_CLASS))
  out = tmp_path_factory.mktemp('mediapipe')
  paths = {}
  for precision in ('fp32', 'int8'):
    paths[precision] = out / f'student_{precision}.tflite'
    # int8 parity on held-out photos follows the brief training's margins (docs/export.md);
    # here the question is whether MediaPipe and kdflax agree on the same file.
    tflite.export_tflite(module, variables, SIZE, paths[precision], precision,
                         calibration_images=calib, labels=LABELS, allow_mismatch=True,
                         model_name='mobilenetv3_small_100')
  return paths


def _mediapipe(model, files) -> list:
  proc = subprocess.run([sys.executable, '-c', _CLIENT, str(model), str(SIZE), str(len(LABELS)),
                         *map(str, files)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _kdflax_predict(model, capsys) -> dict:
  capsys.readouterr()
  assert predict.main(['predict', '--model', str(model), str(VAL), '--no-progress',
                       '--top_k', str(len(LABELS))]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  return {line['file']: line for line in lines}


@pytest.mark.parametrize('precision', ['fp32', 'int8'])
def test_mediapipe_classifies_like_kdflax_predict(exported, capsys, precision):
  model = exported[precision]
  files = find_images([VAL])
  assert len(files) >= 30
  results = _mediapipe(model, files)
  ours = _kdflax_predict(model, capsys)
  agree, score_diff = 0, 0.0
  for path, categories in zip(files, results, strict=True):
    names = {name for name, _, _ in categories}
    assert names == set(LABELS), (path, categories)  # names from the packed label file
    for name, index, _ in categories:
      assert LABELS[index] == name
    scores = np.asarray([score for _, _, score in categories])
    assert np.all((scores >= 0) & (scores <= 1)), (path, scores)
    assert scores.sum() == pytest.approx(1.0, abs=1e-4), (path, scores)
    theirs = {name: score for name, _, score in categories}
    # Top-1 up to exact ties: int8 logits are quantized, so two classes can share one score;
    # MediaPipe then lists either first (its sort is not stable), predict the lower index.
    agree += theirs[ours[path]['label']] == max(theirs.values())
    score_diff = max(score_diff, *(abs(theirs[e['label']] - e['score'])
                                   for e in ours[path]['top_k']))
  print(f'{precision}: top-1 agrees on {agree} of {len(files)}; max score diff {score_diff:.4f}')
  assert agree / len(files) >= 0.99, f'{precision}: top-1 agrees on {agree} of {len(files)}'
  # Same file, same pixels (`eval_view` is MediaPipe's resampling, bit for bit): the scores
  # agree up to the rounding of predict's JSON (6 decimals) and of its renormalisation.
  assert score_diff < 1e-4, score_diff
