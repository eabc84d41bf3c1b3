"""`kdflax app` in a real browser: Debian's headless Chromium (driven by Playwright for Python
through `executable_path`, no browser download) opens the built folder from a loopback static
server and classifies the bundled sample photos through the page's own code path (file picker
-> decode -> eval view -> MediaPipe Tasks for Web `ImageClassifier`, CPU delegate).

Compared with Python on the same model (a MobileNetV3-Small 0.5 at 64 px, the demo's phone
model, trained for a few seconds): top-1 equal to `kdflax predict` on the files on >= 99% of
the photos; and, given the pixels the browser decoded (the page hands them back), its view
equal to `eval_view`'s bit for bit and its probabilities within 1e-4 of the LiteRT
interpreter's, so decoding is the only difference, measured separately. Bad inputs (a model
without labels, corrupt models, a non-image file) show their messages; the page works offline
once opened. Without Chromium the browser tests skip (fail under CI=true: .ci/run installs it).
"""

import base64
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest
from helpers.export_models import BEANS, leaf_images, train_briefly

from kdflax.app import build
from kdflax.app.serve import make_server, urls
from kdflax.commands import app as app_command
from kdflax.commands import predict
from kdflax.data.eval_view import eval_view
from kdflax.export import tflite
from kdflax.export.images import decode_image, find_images
from kdflax.export.interpreter import TFLiteClassifier
from kdflax.models import create_model

SIZE = 64
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')
PHOTOS = [pathlib.Path(p) for p in find_images([BEANS])]  # 165 photos, train and val
CHROMIUM = os.environ.get('KDFLAX_CHROMIUM') or shutil.which('chromium') \
    or shutil.which('chromium-browser')
# The page's record i with its pixels as base64 RGBA (what the browser decoded, and the view).
_RECORD = '''(i) => { const r = window.kdflax.results[i];
  const b64 = (a) => { let s = '';
    for (let k = 0; k < a.length; k += 0x8000) {
      s += String.fromCharCode(...a.subarray(k, k + 0x8000));
    }
    return btoa(s); };
  return {file: r.file, width: r.width, height: r.height, scores: r.scores, ms: r.ms,
          decoded: b64(r.decoded), view: b64(r.view)}; }'''


def _pixels(text: str, height: int, width: int) -> np.ndarray:
  rgba = np.frombuffer(base64.b64decode(text), np.uint8).reshape(height, width, 4)
  return np.ascontiguousarray(rgba[..., :3])


def _export_models(out: pathlib.Path) -> None:
  module, _ = create_model('mobilenetv3_small_050', num_classes=3, drop_rate=0.0)
  photos = leaf_images(SIZE, 'train', per_class=16)
  variables = train_briefly(module, photos, np.repeat(np.arange(3), 16))
  for name, labels in (('leaf', LABELS), ('unlabelled', ())):
    tflite.export_tflite(module, variables, SIZE, out / f'{name}.tflite', 'fp32',
                         calibration_images=photos, labels=labels,
                         model_name='mobilenetv3_small_050')


@pytest.fixture(scope='session')
def models(tmp_path_factory):
  """`{'fp32': labelled model, 'unlabelled': same weights without labels}` paths: a
  MobileNetV3-Small 0.5 at 64 px trained for 60 steps (~20 s), exported once per test run
  (the pytest-xdist workers share it, under a lock)."""
  if os.environ.get('PYTEST_XDIST_WORKER'):
    out = tmp_path_factory.getbasetemp().parent / 'webapp_models'
    out.mkdir(exist_ok=True)
    with open(out / '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not (out / 'done').exists():
        _export_models(out)
        (out / 'done').touch()
  else:
    out = tmp_path_factory.mktemp('webapp_models')
    _export_models(out)
  return {'fp32': out / 'leaf.tflite', 'unlabelled': out / 'unlabelled.tflite'}


@pytest.fixture(scope='session')
def app_dir(models, tmp_path_factory):
  out = tmp_path_factory.mktemp('webapp') / 'leaf_app'
  try:
    build.build_app(models['fp32'], out, title='Bean leaf check', log=lambda _: None)
  except build.AppError as e:
    if 'npm' not in str(e) or os.environ.get('CI'):
      raise
    pytest.skip(str(e))  # no Node.js/npm here to install MediaPipe's files
  return out


@contextlib.contextmanager
def _serving(folder):
  server = make_server(folder, '127.0.0.1', 0, quiet=True)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield urls(server)[0], server
  finally:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope='session')
def browser():
  if not CHROMIUM:
    if os.environ.get('CI'):
      pytest.fail('no chromium on PATH (.ci/run installs it: apt-get install chromium)')
    pytest.skip('no chromium on PATH (apt-get install chromium)')
  sync_api = pytest.importorskip('playwright.sync_api')
  with sync_api.sync_playwright() as p:
    chromium = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
    yield chromium
    chromium.close()


def _open(browser, url):
  page = browser.new_context(viewport={'width': 480, 'height': 760}).new_page()
  page.goto(url)
  page.wait_for_function('window.kdflax && (window.kdflax.info || window.kdflax.errors.length)',
                         timeout=60_000)
  assert page.evaluate('window.kdflax.errors') == []
  return page


def _wait_for(page, count):
  page.wait_for_function(f'kdflax.results.length + kdflax.errors.length >= {count}',
                         timeout=120_000)


def test_the_page_classifies_the_sample_photos_as_python_does(browser, app_dir, models,
                                                               capsys):
  with _serving(app_dir) as (url, _):
    page = _open(browser, url + '?keep_pixels')
    page.set_input_files('#photos', [str(p) for p in PHOTOS])
    _wait_for(page, len(PHOTOS))
    assert page.evaluate('kdflax.errors') == []
    records = [page.evaluate(_RECORD, i) for i in range(len(PHOTOS))]
    header = page.inner_text('#model-line')
    shot = os.environ.get('KDFLAX_WEBAPP_SCREENSHOT')
    if shot:
      page.evaluate('window.scrollTo(0, 0)')
      page.screenshot(path=shot)
    page.context.close()
  assert [r['file'] for r in records] == [os.path.basename(p) for p in PHOTOS]
  assert 'mobilenetv3_small_050' in header and 'MB' in header and '64 px' in header

  decoded = [_pixels(r['decoded'], r['height'], r['width']) for r in records]
  views = np.stack([_pixels(r['view'], SIZE, SIZE) for r in records])
  np.testing.assert_array_equal(views, np.stack([eval_view(d, SIZE) for d in decoded]))
  clf = TFLiteClassifier(models['fp32'])
  python = predict.probabilities(clf(views), clf.output_kind)
  browser_scores = np.array([r['scores'] for r in records])
  np.testing.assert_allclose(browser_scores, python, atol=1e-4, rtol=0)

  capsys.readouterr()
  assert predict.main(['predict', '--model', str(models['fp32']), '--no-progress',
                       *map(str, PHOTOS)]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  agreement = np.mean([line['index'] == int(np.argmax(s))
                       for line, s in zip(lines, browser_scores, strict=True)])
  assert agreement >= 0.99
  decode_diff = max(int(np.abs(decode_image(p).astype(int) - d).max())
                    for p, d in zip(PHOTOS, decoded, strict=True))
  with capsys.disabled():
    print(f'\nwebapp: {len(PHOTOS)} photos, top-1 agreement with kdflax predict '
          f'{agreement:.1%}, max |browser - interpreter| on the browser\'s pixels '
          f'{np.abs(browser_scores - python).max():.1e}, max decode difference vs PIL '
          f'{decode_diff}/255, median {np.median([r["ms"] for r in records]):.1f} ms/photo')


def test_bad_inputs_show_clear_messages(browser, app_dir, models, tmp_path):
  notes = tmp_path / 'notes.txt'
  notes.write_text('not a photo')
  truncated = tmp_path / 'truncated.tflite'
  truncated.write_bytes(models['fp32'].read_bytes()[:40_000])
  renamed = tmp_path / 'photo.tflite'
  renamed.write_bytes(PHOTOS[0].read_bytes())
  with _serving(app_dir) as (url, _):
    page = _open(browser, url)
    page.set_input_files('#photos', [str(notes), str(PHOTOS[0])])
    _wait_for(page, 2)
    assert page.evaluate('kdflax.errors') == [
        'notes.txt: not an image this browser can read (JPEG, PNG, WebP, GIF or BMP)']
    assert 'notes.txt: not an image' in page.inner_text('#results li.failed')
    assert page.evaluate('kdflax.results.length') == 1  # the photo after it still ran
    expected = {
        models['unlabelled']: 'unlabelled.tflite: the model has no class names',
        truncated: 'truncated.tflite: the file is truncated or damaged',
        renamed: 'photo.tflite: not a TFLite model (no TFL3 identifier)',
    }
    for path, message in expected.items():
      count = page.evaluate('kdflax.errors.length')
      page.set_input_files('#model-file', str(path))
      page.wait_for_function(f'kdflax.errors.length > {count}', timeout=60_000)
      assert page.inner_text('#error').startswith(message)
      assert page.inner_text('#status') == 'Ready (previous model).'
    page.set_input_files('#photos', str(PHOTOS[1]))  # the app's own model still classifies
    _wait_for(page, 6)
    assert page.evaluate('kdflax.results.length') == 2
    page.context.close()


def test_the_page_works_offline_once_opened(browser, app_dir):
  with _serving(app_dir) as (url, _):
    page = _open(browser, url)
    page.wait_for_function('navigator.serviceWorker.controller !== null || '
                           'navigator.serviceWorker.ready.then(() => true)', timeout=60_000)
    page.evaluate('navigator.serviceWorker.ready')
    page.wait_for_function('document.getElementById("offline").textContent !== ""')
  page.reload()  # the server is gone: everything comes from the service worker's cache
  page.wait_for_function('window.kdflax && window.kdflax.info', timeout=60_000)
  page.set_input_files('#photos', str(PHOTOS[0]))
  _wait_for(page, 1)
  assert page.evaluate('kdflax.errors') == []
  assert page.evaluate('kdflax.results[0].label') in LABELS
  page.context.close()


def test_the_command_refuses_what_the_page_cannot_run(models, app_dir, tmp_path, capsys):
  truncated = tmp_path / 'truncated.tflite'
  truncated.write_bytes(models['fp32'].read_bytes()[:40_000])
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'thesis.tex').write_text('keep me')
  cases = [
      (['--model', str(models['unlabelled']), '--out', str(tmp_path / 'a')],
       'no class names in its standard TFLite metadata'),
      (['--model', str(truncated), '--out', str(tmp_path / 'a')], 'truncated'),
      (['--model', str(models['fp32']), '--out', str(tmp_path / 'mine')],
       'exists and is not a folder kdflax app wrote'),
      (['--out', str(tmp_path / 'none'), '--serve'], 'no index.html'),
      (['--out', str(tmp_path / 'a')], 'give --model'),
  ]
  for args, message in cases:
    assert app_command.main(['app', *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 or 'usage' in err, err
  assert (tmp_path / 'mine' / 'thesis.tex').read_text() == 'keep me'
  assert not (tmp_path / 'a').exists()
  # A folder kdflax app wrote is rebuilt in place, with the same files.
  assert app_command.main(['app', '--model', str(models['fp32']), '--out', str(app_dir)]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary['labels'] == list(LABELS) and summary['image_size'] == SIZE
  assert sorted(p.name for p in app_dir.iterdir()) == sorted(
      {f.split('/')[0] for f in build.PAGE_FILES + ('model.tflite', 'model.json', 'sw.js',
                                                    'manifest.webmanifest', 'mediapipe')})


@pytest.mark.filterwarnings('ignore:os.fork')  # fork + exec at once (preexec_fn), no JAX
def test_serve_prints_the_addresses_and_serves_wasm(app_dir):
  """`kdflax app --serve` in its own process: the URL it prints serves the page and the WASM
  with the MIME type browsers require; Ctrl-C stops it with exit status 0."""
  proc = subprocess.Popen(
      [sys.executable, '-m', 'kdflax.cli', 'app', '--out', str(app_dir), '--serve',
       '--host', '127.0.0.1', '--port', '0'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    assert proc.stdout.readline().startswith(f'serving {app_dir}')
    url = proc.stdout.readline().strip()
    assert url.startswith('http://127.0.0.1:')
    with urllib.request.urlopen(url) as response:
      assert b'<script type="module" src="app.js">' in response.read()
    with urllib.request.urlopen(url + 'mediapipe/wasm/vision_wasm_internal.wasm') as response:
      assert response.headers['Content-Type'] == 'application/wasm'
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
  finally:
    proc.kill()
    proc.wait()
