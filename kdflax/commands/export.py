"""`kdflax export`: a model directory (or fresh weights) -> `.tflite` + parity check + report.

    kdflax export --checkpoint runs/distill/best --out out/student.tflite --precision int8 \\
        --calibration data/beans_sample/train --eval data/beans_sample/val
    kdflax export --checkpoint DIR --out out/student.tflite --precision fp32 fp16 int8 \\
        --calibration DIR    # -> student_fp32.tflite, student_fp16.tflite, student_int8.tflite
    kdflax export --model mobilenetv3_large_100 --num_classes 10 --out out/m.tflite \\
        --calibration data/beans_sample/train      # freshly initialised weights, for benchmarks

Each `.tflite` takes `(batch, S, S, 3)` uint8 RGB 0..255 and returns float32 class
probabilities (softmax in the graph; `--output logits` for logits; see
`kdflax/export/tflite.py`); it carries standard TFLite Model Metadata (MediaPipe
`ImageClassifier` runs it as is) with the class names packed inside, which also go into
`NAME.labels.txt`. Every
export is run in LiteRT (child process) and compared with JAX on the evaluation images (else
the calibration images): fp32 within 1e-4, fp16 within 1e-2, int8 top-1 agreement >= 98%. A
failed check is an error (exit 1, no file written) unless `--allow-mismatch`.

Unless `--no-report`, `STEM.report.json` and `STEM.report.md` go beside the model(s): params,
MACs, file size, latency (median / p90, 1 and 4 threads), peak memory and, with `--eval DIR`
(`DIR/<class>/*.jpg`), the accuracy of JAX and of each exported precision.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from kdflax.export.model_metadata import OUTPUTS
from kdflax.export.tflite import INPUT_TYPES, PRECISIONS


def _parser(prog: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
  src = p.add_argument_group('model (one of)')
  src.add_argument('--checkpoint', help='model directory (model.json + variables/)')
  src.add_argument('--model', help='registered model name; exports freshly initialised weights')
  src.add_argument('--num_classes', type=int, help='with --model: classifier size')
  src.add_argument('--image_size', type=int, help='input resolution (default: the model\'s)')
  src.add_argument('--labels', help='with --model: comma-separated class names')
  src.add_argument('--seed', type=int, default=0, help='with --model: initialisation seed')
  p.add_argument('--out', required=True, help='output FILE.tflite')
  p.add_argument('--precision', nargs='+', default=['fp32'], choices=PRECISIONS,
                 help='one or more of fp32 fp16 int8; with several, FILE gets a _PRECISION '
                      'suffix per export')
  p.add_argument('--calibration', help='folder of real photos (searched recursively); '
                 'int8 calibration set and default parity set')
  p.add_argument('--num_calibration', type=int, default=128,
                 help='at most this many calibration images, spread over the folder')
  p.add_argument('--eval', dest='eval_dir',
                 help='labelled folder DIR/<class>/*.jpg: parity images and report accuracy')
  p.add_argument('--num_eval', type=int, default=500, help='at most this many eval images')
  p.add_argument('--batch', type=int, default=1, help='static batch of the exported input')
  p.add_argument('--input_type', choices=INPUT_TYPES, default='uint8',
                 help='uint8 0..255 (default) or float32 0..1 input')
  p.add_argument('--output', choices=OUTPUTS, default='probabilities',
                 help='what the file outputs: class probabilities (softmax in the graph, '
                      'default) or logits')
  p.add_argument('--allow-mismatch', '--allow_mismatch', dest='allow_mismatch',
                 action='store_true', help='write the file even if the parity check fails')
  p.add_argument('--no-report', '--no_report', dest='report', action='store_false',
                 help='skip latency / memory / accuracy measurements')
  p.add_argument('--runs', type=int, default=30, help='timed invocations per latency figure')
  return p


def output_paths(out: str, precisions: list[str]) -> dict[str, str]:
  """`{precision: path}`: `out` itself for one precision, `STEM_PRECISION.tflite` for several."""
  if len(precisions) == 1:
    return {precisions[0]: out}
  stem = out[:-len('.tflite')] if out.endswith('.tflite') else out
  return {p: f'{stem}_{p}.tflite' for p in precisions}


def _load(args: argparse.Namespace) -> tuple[Any, dict, int, tuple[str, ...], str, str]:
  """-> (module, variables, image_size, labels, model name, description of the weights)."""
  if args.checkpoint:
    from kdflax.train.checkpoint import load_model
    info, variables = load_model(args.checkpoint)
    module, image_size = info.create()
    if args.image_size and args.image_size != image_size and hasattr(module, 'img_size'):
      raise ValueError(f'{args.checkpoint}: {info.model} is built for {image_size} px; '
                       '--image_size cannot change it')
    return (module, variables, args.image_size or image_size, info.labels, info.model,
            f'model directory {args.checkpoint}')
  from kdflax.models import create_model
  from kdflax.models.init import init_variables
  labels = tuple(s.strip() for s in args.labels.split(',')) if args.labels else ()
  module, image_size = create_model(args.model, args.num_classes)
  if args.image_size and hasattr(module, 'img_size'):
    module, image_size = create_model(args.model, args.num_classes, img_size=args.image_size)
  image_size = args.image_size or image_size
  variables = init_variables(module, args.seed, image_size)
  return (module, dict(variables), image_size, labels, args.model,
          f'freshly initialised (seed {args.seed})')


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if bool(args.checkpoint) == bool(args.model):
    p.error('give exactly one of --checkpoint DIR or --model NAME')
  if args.model and not args.num_classes:
    p.error('--model needs --num_classes')
  if args.checkpoint and (args.num_classes or args.labels):
    p.error('--num_classes / --labels go with --model; a model directory has its own')
  if 'int8' in args.precision and not args.calibration:
    p.error('--precision int8 needs --calibration DIR (real photos for quantization)')
  for flag, value in (('--calibration', args.calibration), ('--eval', args.eval_dir),
                      ('--checkpoint', args.checkpoint)):
    if value and not os.path.isdir(value):
      p.error(f'{flag} {value}: not a folder')
  if args.batch < 1:
    p.error('--batch must be >= 1')
  if not args.out.endswith('.tflite'):
    p.error(f'--out {args.out}: expected a FILE.tflite path')
  if len(set(args.precision)) != len(args.precision):
    p.error('--precision lists a precision twice')


def _eval_set(folder: str, size: int, limit: int, labels: tuple[str, ...]
              ) -> tuple[np.ndarray, np.ndarray]:
  """Labelled images of `folder`, indices mapped onto the model's label order."""
  from kdflax.export.images import labelled_folder, load_image
  files, idx, classes = labelled_folder(folder)
  if labels:
    missing = [c for c in classes if c not in labels]
    if missing:
      raise ValueError(f'{folder}: classes {missing} are not among the model labels {list(labels)}')
    idx = np.asarray([labels.index(classes[i]) for i in idx], np.int32)
  if len(files) > limit:
    keep = sorted(set(np.linspace(0, len(files) - 1, limit).round().astype(int)))
    files, idx = [files[i] for i in keep], idx[keep]
  images, kept = [], []
  for f, i in zip(files, idx, strict=True):
    try:
      images.append(load_image(f, size))
      kept.append(i)
    except ValueError as e:
      print(f'warning: skipping {e}', file=sys.stderr)
  return np.stack(images), np.asarray(kept, np.int32)


def main(argv: list[str]) -> int:
  """`argv[0]` is the command name. Returns 0 on success, 1 on failure, 2 on bad usage."""
  parser = _parser(f'kdflax {argv[0] if argv else "export"}')
  try:
    args = parser.parse_args(argv[1:])
    _validate(parser, args)
  except SystemExit as e:
    return int(e.code or 0)
  try:
    return _run(args)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    hint = ''
    if args.model and 'parity FAILED' in str(e):
      hint = ('\n  (freshly initialised weights have no class margins, so reduced precision '
              'flips their arg-max; --allow-mismatch exports them anyway, e.g. for benchmarks)')
    print(f'kdflax export: error: {e}{hint}', file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
  from kdflax.export.images import sample_images
  from kdflax.export.report import accuracy, measure_tflite, write_report
  from kdflax.export.tflite import export_tflite, jax_logits, serving_function
  from kdflax.models.complexity import count_macs, count_params

  module, variables, size, labels, name, source = _load(args)
  calib = None
  if args.calibration:
    calib = sample_images(args.calibration, size, args.num_calibration)
    print(f'calibration: {len(calib)} images from {args.calibration}', file=sys.stderr)
  eval_images = eval_labels = None
  if args.eval_dir:
    eval_images, eval_labels = _eval_set(args.eval_dir, size, args.num_eval, labels)
    print(f'eval: {len(eval_images)} labelled images from {args.eval_dir}', file=sys.stderr)
  if args.model and calib is not None and 'batch_stats' in variables:
    from kdflax.export.stand_in import calibrate_batch_stats
    variables = calibrate_batch_stats(module, variables, calib[:32])
    print('fresh weights: BatchNorm statistics set from the calibration images',
          file=sys.stderr)
  parity_images = eval_images if eval_images is not None else calib

  exports = []
  for precision, path in output_paths(args.out, args.precision).items():
    result = export_tflite(
        module, variables, size, path, precision=precision, calibration_images=calib,
        parity_images=parity_images, batch=args.batch, labels=labels,
        input_type=args.input_type, allow_mismatch=args.allow_mismatch, model_name=name,
        output=args.output)
    print(f'{result.path}: {result.size_mb:.2f} MB; {result.parity.summary()}')
    exports.append(result)
  if not args.report:
    return 0

  report: dict[str, Any] = {
      'model': name, 'source': source, 'image_size': size,
      'labels': list(labels), 'batch': args.batch,
      'input_desc': f'image ({args.batch}, {size}, {size}, 3) {args.input_type} RGB '
                    f'{"0..255" if args.input_type == "uint8" else "0..1"} -> '
                    f'{args.output} float32',
      'output': args.output,
      'num_classes': exports[0].num_classes,
      'params': count_params(variables), 'macs': count_macs(module, variables, size),
      'jax_accuracy': None, 'eval_folder': args.eval_dir,
      'eval_images': None if eval_images is None else int(len(eval_images)), 'exports': []}
  if eval_images is not None:
    fn = serving_function(module, variables, 'uint8')
    logits = jax_logits(fn, eval_images)
    report['jax_accuracy'] = accuracy(logits, eval_labels)
  for result in exports:
    print(f'measuring {os.path.basename(result.path)} ...', file=sys.stderr)
    stats = measure_tflite(result.path, eval_images, eval_labels, runs=args.runs)
    stats.update(precision=result.precision, ops=dict(result.ops),
                 parity=result.parity.as_dict(), parity_summary=result.parity.summary())
    report['exports'].append(stats)
  stem = args.out[:-len('.tflite')]
  json_path, md_path = write_report(stem, report)
  print(f'report: {json_path}, {md_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main(['export', *sys.argv[1:]]))
