"""The web app's inference time in headless Chromium (MediaPipe Tasks for Web, WASM, CPU
delegate) against the LiteRT Python interpreter, same files, same machine, one run.

    .venv/bin/python tools/bench_webapp.py                      # demo-style int8 and fp32 files
    .venv/bin/python tools/bench_webapp.py --model a.tflite --model b.tflite --json out.json

Files: `--model` paths, else the demo's phone model as `make demo` exports it
(MobileNetV3-Small 0.5 at 64 px, 3 bean classes, fp32 and int8 calibrated on
data/beans_sample/train), with fresh weights (`kdflax export --model`: the same graph and ops,
so the same time; the demo's trained file is not needed).

Browser: `kdflax app` folders served on loopback, Debian's chromium driven by Playwright;
the page classifies the 45 val photos (its whole path per photo: decode, view, classify,
render), then `kdflax.bench(runs)` times `--runs` calls of `ImageClassifier.classify` on the
last view (what the page shows as the time), `--trials` times: per call, and the loop's mean
per call (the browser's clock has 0.1 ms steps); with `navigator.hardwareConcurrency` as the
browser says ('default') and forced to 1 ('1 thread'). Python: `benchmark_isolated` (LiteRT,
XNNPACK) with 1 thread and with `kdflax predict`'s default (min(4, cores)). Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
LABELS = 'angular_leaf_spot,bean_rust,healthy'
ONE_THREAD = 'Object.defineProperty(navigator, "hardwareConcurrency", {get: () => 1});'


def _demo_files(folder: str) -> list[str]:
  """Exports the demo-style fp32 and int8 files into `folder` (fresh weights)."""
  out = os.path.join(folder, 'demo_style.tflite')
  subprocess.run([sys.executable, '-m', 'kdflax.cli', 'export', '--model', 'mobilenetv3_small_050',
                  '--num_classes', '3', '--labels', LABELS, '--image_size', '64', '--out', out,
                  '--precision', 'fp32', 'int8', '--calibration',
                  os.path.join(ROOT, 'data', 'beans_sample', 'train'), '--allow-mismatch',
                  '--no-report'], check=True, stdout=subprocess.DEVNULL)
  return [os.path.join(folder, f'demo_style_{p}.tflite') for p in ('int8', 'fp32')]


def _cpu() -> str:
  try:
    for line in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines():
      if line.startswith('Model name:'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return 'unknown CPU'


def _browser_times(browser, url: str, photos: list[str], runs: int, trials: int,
                   one_thread: bool) -> dict:
  context = browser.new_context()
  if one_thread:
    context.add_init_script(ONE_THREAD)
  page = context.new_page()
  page.goto(url)
  page.wait_for_function('window.kdflax && window.kdflax.info', timeout=120_000)
  start = time.perf_counter()
  page.set_input_files('#photos', photos)
  page.wait_for_function(f'kdflax.results.length + kdflax.errors.length >= {len(photos)}',
                         timeout=300_000)
  per_photo = (time.perf_counter() - start) * 1e3 / len(photos)
  page.evaluate(f'kdflax.bench({runs})')  # warm-up
  times, means = [], []
  for _ in range(trials):  # the browser's clock has 0.1 ms steps: also time the whole loop
    start = page.evaluate('performance.now()')
    times += page.evaluate(f'kdflax.bench({runs})')
    means.append((page.evaluate('performance.now()') - start) / runs)
  threads = page.evaluate('navigator.hardwareConcurrency')
  context.close()
  return {'median_ms': float(np.median(times)), 'p90_ms': float(np.percentile(times, 90)),
          'trial_mean_ms': means, 'mean_ms': float(np.median(means)),
          'page_per_photo_ms': per_photo, 'hardware_concurrency': threads}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', action='append', help='.tflite to time (repeatable)')
  p.add_argument('--runs', type=int, default=50)
  p.add_argument('--trials', type=int, default=5)
  p.add_argument('--chromium', default='/usr/bin/chromium')
  p.add_argument('--json', help='write the results here')
  args = p.parse_args(argv)
  from playwright.sync_api import sync_playwright

  from kdflax.app.build import build_app, pinned_version
  from kdflax.app.serve import make_server
  from kdflax.export.images import find_images
  from kdflax.export.isolated import benchmark_isolated
  photos = find_images([os.path.join(ROOT, 'data', 'beans_sample', 'val')])
  default_threads = max(1, min(4, os.cpu_count() or 1))
  rows = []
  with tempfile.TemporaryDirectory(prefix='kdflax-bench-webapp-') as tmp:
    models = args.model or _demo_files(tmp)
    for threads in (1, default_threads):
      for model, stats in zip(models, benchmark_isolated(models, threads=threads, runs=args.runs,
                                                          trials=args.trials), strict=True):
        rows.append({'model': os.path.basename(model), 'runner': 'LiteRT Python interpreter',
                     'threads': threads, 'median_ms': stats['median_ms'],
                     'p90_ms': stats['p90_ms']})
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=args.chromium, args=['--no-sandbox'])
      for i, model in enumerate(models):
        folder = os.path.join(tmp, f'app{i}')
        build_app(model, folder, log=lambda _: None)
        server = make_server(folder, '127.0.0.1', 0, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f'http://127.0.0.1:{server.server_address[1]}/'
        for one in (True, False):
          r = _browser_times(browser, url, photos, args.runs, args.trials, one)
          rows.append({'model': os.path.basename(model), 'runner': 'Chromium WASM (MediaPipe)',
                       'threads': '1' if one else f'default ({r.pop("hardware_concurrency")})',
                       **{k: v for k, v in r.items() if k != 'hardware_concurrency'}})
        server.shutdown()
        server.server_close()
      version = browser.version
      browser.close()
  result = {'cpu': _cpu(), 'cores': os.cpu_count(), 'chromium': version,
            'mediapipe': pinned_version(), 'runs': args.runs, 'trials': args.trials,
            'rows': rows}
  print(f'{result["cpu"]}, {result["cores"]} cores; Chromium {version}; '
        f'@mediapipe/tasks-vision {result["mediapipe"]}')
  for r in rows:
    page = (f'  loop mean {r["mean_ms"]:.3f} ms  page {r["page_per_photo_ms"]:.1f} ms/photo'
            if 'page_per_photo_ms' in r else '')
    print(f'{r["model"]:<24} {r["runner"]:<26} threads {str(r["threads"]):<12} '
          f'median {r["median_ms"]:.3f} ms  p90 {r["p90_ms"]:.3f} ms{page}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
