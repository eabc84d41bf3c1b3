"""Our MobileNetV3 student `.tflite` against Keras' MobileNetV3 through the same converter.

    .venv/bin/python tools/bench_tflite.py                       # Large + Small, 224 px, 1 thread
    .venv/bin/python tools/bench_tflite.py --models large --threads 1 4 --trials 28 --processes 7

For each variant (Large, Small):
  ours   kdflax `export_tflite` of the registered student (`mobilenetv3_{large,small}_100`),
         fp32 and int8 (uint8 RGB in, float logits out), weights freshly initialised with
         BatchNorm statistics of real photos (`kdflax.export.stand_in`), or `--checkpoint`;
  keras  `keras.applications.MobileNetV3{Large,Small}(weights=None, classes=K)` at the same
         resolution, converted by the same `tf.lite.TFLiteConverter` (builtin ops; int8 =
         full-integer with the same representative photos, per-channel weights, the converter's
         default float input and output).

All files are timed by the same LiteRT interpreter (XNNPACK, same thread count) in
`--processes` child processes, each loading every file in its own random order (where a
model's buffers land in memory shifts its latency by a few percent for the whole life of a
process: two copies of ONE file in one process measured up to 4% apart), trials interleaved
with the order rotating, `--runs` invocations per trial. Reported:
median wall time and median CPU time per invoke (CPU time = wall time minus time the OS gave to
other processes, robust on a shared machine), file sizes, op histograms, XNNPACK partitions, and
ratios computed per trial (median over trials). `--json` saves everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def _keras_tflite(variant: str, size: int, classes: int, precision: str,
                  calib: np.ndarray) -> bytes:
  import keras
  import tensorflow as tf

  from kdflax.export.converter import native_stderr_silenced
  build = getattr(keras.applications, f'MobileNetV3{variant.capitalize()}')
  model = build(input_shape=(size, size, 3), weights=None, classes=classes)
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if precision == 'int8':
    data = calib.astype(np.float32)  # Keras' model rescales 0..255 itself

    def representative():
      for image in data:
        yield [image[None]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
  with native_stderr_silenced():
    return converter.convert()


def _ours(variant: str, size: int, classes: int, precision: str, calib: np.ndarray,
          out: str, variables_cache: dict, checkpoint: str | None) -> dict:
  import jax
  import jax.numpy as jnp

  from kdflax.export.stand_in import calibrate_batch_stats
  from kdflax.export.tflite import export_tflite
  from kdflax.models import create_model
  if checkpoint:
    from kdflax.train.checkpoint import load_model
    info, variables = load_model(checkpoint)
    module, size = info.create()
    name = info.model
  else:
    name = f'mobilenetv3_{variant}_100'
    module, _ = create_model(name, classes)
    if name not in variables_cache:
      variables = module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
      variables_cache[name] = calibrate_batch_stats(module, variables, calib[:8])
    variables = variables_cache[name]
  result = export_tflite(module, variables, size, out, precision, calibration_images=calib,
                         allow_mismatch=True, model_name=name)
  return {'parity': result.parity.summary(), 'parity_passed': result.parity.passed}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', nargs='+', default=['large', 'small'], choices=['large', 'small'])
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--threads', nargs='+', type=int, default=[1])
  p.add_argument('--trials', type=int, default=21, help='interleaved timing rounds (all '
                 'processes together)')
  p.add_argument('--processes', type=int, default=7, help='child processes the trials are '
                 'spread over, each with its own memory placement')
  p.add_argument('--runs', type=int, default=10, help='timed invocations per model per round')
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--calibration', default=os.path.join(ROOT, 'data', 'beans_sample', 'train'))
  p.add_argument('--num_calibration', type=int, default=48)
  p.add_argument('--checkpoint', help='our student from a model directory instead of fresh '
                 'weights (only with one --models entry)')
  p.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'bench_tflite'))
  p.add_argument('--json', help='write all figures here')
  args = p.parse_args(argv)

  from kdflax.export import inventory
  from kdflax.export.images import sample_images
  from kdflax.export.interpreter import TFLiteClassifier
  from kdflax.export.isolated import benchmark_isolated

  os.makedirs(args.workdir, exist_ok=True)
  size = args.image_size
  calib = sample_images(args.calibration, size, args.num_calibration)
  print(f'calibration: {len(calib)} photos from {args.calibration}', file=sys.stderr)
  files: dict[tuple[str, str, str], str] = {}
  info: dict[str, dict] = {}
  cache: dict = {}
  for variant in args.models:
    for precision in ('fp32', 'int8'):
      start = time.time()
      path = os.path.join(args.workdir, f'ours_{variant}_{precision}.tflite')
      extra = _ours(variant, size, args.num_classes, precision, calib, path, cache,
                    args.checkpoint)
      files[('ours', variant, precision)] = path
      info[path] = extra
      print(f'ours  {variant} {precision}: {time.time() - start:.0f} s', file=sys.stderr)
      start = time.time()
      path = os.path.join(args.workdir, f'keras_{variant}_{precision}.tflite')
      with open(path, 'wb') as f:
        f.write(_keras_tflite(variant, size, args.num_classes, precision, calib))
      files[('keras', variant, precision)] = path
      info[path] = {}
      print(f'keras {variant} {precision}: {time.time() - start:.0f} s', file=sys.stderr)

  results: dict = {'image_size': size, 'num_classes': args.num_classes, 'trials': args.trials,
                   'processes': args.processes,
                   'runs': args.runs, 'command': ' '.join(['tools/bench_tflite.py',
                                                           *(argv or sys.argv[1:])]),
                   'models': {}, 'ratios': {}}
  for path in files.values():
    content = open(path, 'rb').read()
    results['models'][os.path.basename(path)] = {
        'size_mb': len(content) / 1e6, 'ops': inventory.op_histogram(content),
        'partitions': TFLiteClassifier(path).delegate_partitions, **info[path]}

  keys = list(files)
  for threads in args.threads:
    stats = benchmark_isolated([files[k] for k in keys], threads=threads, warmup=args.warmup,
                               runs=args.runs, trials=args.trials, processes=args.processes)
    by_key = dict(zip(keys, stats, strict=True))
    for k, s in by_key.items():
      results['models'][os.path.basename(files[k])][f'threads_{threads}'] = {
          'median_ms': s['median_ms'], 'p90_ms': s['p90_ms'], 'cpu_median_ms': s['cpu_median_ms'],
          'trial_median_ms': s['trial_median_ms'], 'trial_cpu_median_ms': s['trial_cpu_median_ms']}

    def ratio(a, b, field, by_key=by_key):
      x, y = np.asarray(by_key[a][field]), np.asarray(by_key[b][field])
      return float(np.median(x / y)), float(np.min(x / y)), float(np.max(x / y))

    print(f'\n== {size} px, batch 1, {threads} thread(s), {args.trials} interleaved trials x '
          f'{args.runs} runs in {args.processes} processes (median per trial; wall / CPU ms) ==')
    print(f'{"file":<24} {"MB":>6} {"wall ms":>8} {"CPU ms":>8} {"p90 ms":>8} {"parts":>5}')
    for k in keys:
      name = os.path.basename(files[k])
      m = results['models'][name]
      s = by_key[k]
      print(f'{name:<24} {m["size_mb"]:6.2f} {s["median_ms"]:8.2f} {s["cpu_median_ms"]:8.2f} '
            f'{s["p90_ms"]:8.2f} {m["partitions"]:5d}')
    for variant in args.models:
      pairs = {
          f'ours {variant} fp32 / keras {variant} fp32':
              (('ours', variant, 'fp32'), ('keras', variant, 'fp32')),
          f'ours {variant} int8 / ours {variant} fp32':
              (('ours', variant, 'int8'), ('ours', variant, 'fp32')),
          f'keras {variant} int8 / keras {variant} fp32':
              (('keras', variant, 'int8'), ('keras', variant, 'fp32')),
          f'ours {variant} int8 / keras {variant} int8':
              (('ours', variant, 'int8'), ('keras', variant, 'int8')),
      }
      for label, (a, b) in pairs.items():
        wall = ratio(a, b, 'trial_median_ms')
        cpu = ratio(a, b, 'trial_cpu_median_ms')
        results['ratios'][f'{label} @{threads}t'] = {'wall': wall, 'cpu': cpu}
        print(f'{label:<36} wall {wall[0]:.3f} (trials {wall[1]:.2f}..{wall[2]:.2f})  '
              f'CPU {cpu[0]:.3f} (trials {cpu[1]:.2f}..{cpu[2]:.2f})')
      size_ratio = (results['models'][f'ours_{variant}_fp32.tflite']['size_mb']
                    / results['models'][f'keras_{variant}_fp32.tflite']['size_mb'])
      print(f'{"size ours/keras fp32 " + variant:<36} {size_ratio:.3f}; ours int8 file '
            f'{results["models"][f"ours_{variant}_int8.tflite"]["size_mb"]:.2f} MB')

  print('\n== op histograms (main subgraph) ==')
  for name, m in results['models'].items():
    print(f'{name}: {m["partitions"]} XNNPACK partition(s); {m["ops"]}'
          + (f'; {m["parity"]}' if m.get('parity') else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'\nwrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
