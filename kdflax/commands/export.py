"""`kdflax export`: a model directory (or fresh weights) -> `.tflite` + parity check + report.

    kdflax export --checkpoint runs/distill/best --out out/student.tflite --precision int8 \\
        --calibration data/beans_sample/train --eval data/beans_sample/val
    kdflax export --checkpoint DIR --out out/student.tflite --precision fp32 fp16 int8 \\
        --calibration DIR    # -> student_fp32.tflite, student_fp16.tflite, student_int8.tflite
    kdflax export --checkpoint DIR --out out/student.tflite --precision int8 \\
        --config configs/plantvillage_tomato_swin_l_mnv3.py   # photos of the configured data
    kdflax export --model mobilenetv3_large_100 --num_classes 10 --out out/m.tflite \\
        --calibration data/beans_sample/train      # freshly initialised weights, for benchmarks

Each `.tflite` takes `(batch, S, S, 3)` uint8 RGB 0..255 and returns float32 class
probabilities (softmax in the graph; `--output logits` for logits; see
`kdflax/export/tflite.py`); it carries standard TFLite Model Metadata (MediaPipe
`ImageClassifier` runs it as is) with the class names packed inside, which also go into
`NAME.labels.txt`. Every
export is run in LiteRT (child process) and compared with JAX on the evaluation images (else
the calibration images): fp32 within 1e-4, fp16 within 2e-2, int8 top-1 agreement >= 98%. A
failed check is an error (exit 1, no file written) unless `--allow-mismatch`.

With `--config FILE` (and `--config.key=value` overrides) the calibration photos come from the
config's train split and the evaluation photos from its eval split, through its data source
(image folders or TFDS, e.g. `plant_village` tomato), instead of `--calibration` / `--eval`.

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

from kdflax.data.photos import to_model_labels
from kdflax.export.converter import DEFAULT_ACTIVATION_PERCENTILE, PRECISIONS
from kdflax.export.model_metadata import OUTPUTS
from kdflax.export.serving import INPUT_TYPES


def _parser(prog: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
  src = p.add_argument_group('model (one of)')
  src.add_argument('--checkpoint', help='model directory (model.json + variables/) or a '
                   'training workdir (its model_best/)')
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
  p.add_argument('--config', help='config file: calibration photos from its train split, eval '
                 'photos from its eval split (any data source; --config.key=value overrides)')
  p.add_argument('--batch', type=int, default=1, help='static batch of the exported input')
  p.add_argument('--input_type', choices=INPUT_TYPES, default='uint8',
                 help='uint8 0..255 (default) or float32 0..1 input')
  p.add_argument('--output', choices=OUTPUTS, default='probabilities',
                 help='what the file outputs: class probabilities (softmax in the graph, '
                      'default) or logits')
  p.add_argument('--activation_percentile', type=float, default=DEFAULT_ACTIVATION_PERCENTILE,
                 help='int8: each activation range is this percentile interval of its '
                      'calibration values, e.g. 99.99 (default: the converter\'s min/max)')
  p.add_argument('--allow-mismatch', '--allow_mismatch', dest='allow_mismatch',
                 action='store_true', help='write the file even if the parity check fails')
  p.add_argument('--no-report', '--no_report', dest='report', action='store_false',
                 help='skip latency / memory / accuracy measurements')
  p.add_argument('--runs', type=int, default=30, help='timed invocations per latency figure')
  return p


def _load(args: argparse.Namespace) -> tuple[Any, dict, int, tuple[str, ...], str, str]:
  """-> (module, variables, image_size, labels, model name, description of the weights)."""
  if args.checkpoint:
    from kdflax.train.checkpoint import load_model, resolve_model_dir
    info, variables = load_model(resolve_model_dir(args.checkpoint))
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
  if args.config and (args.calibration or args.eval_dir):
    p.error('give --config FILE or --calibration / --eval folders, not both')
  if 'int8' in args.precision and not (args.calibration or args.config):
    p.error('--precision int8 needs --calibration DIR or --config FILE (real photos for '
            'quantization)')
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
  idx = to_model_labels(idx, classes, labels, folder)
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
  from kdflax.commands.common import parse_with_overrides
  parser = _parser(f'kdflax {argv[0] if argv else "export"}')
  try:
    args, overrides = parse_with_overrides(parser, argv[1:])
    if overrides and not args.config:
      parser.error(f'{overrides[0]}: --config.* overrides need --config FILE')
    _validate(parser, args)
  except SystemExit as e:
    return int(e.code or 0)
  from kdflax.train import interrupt
  try:
    with interrupt.handle_signals('export', ''):
      return _run(args, overrides)
  except interrupt.Interrupted as e:
    print(f'kdflax export: stopped by {interrupt.signal_name(e.signum)}; the .tflite under way '
          'was not written (each file is written whole or not at all)', file=sys.stderr)
    return e.exit_code
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    hint = ''
    if args.model and 'parity FAILED' in str(e):
      hint = ('\n  (freshly initialised weights have no class margins, so reduced precision '
              'flips their arg-max; --allow-mismatch exports them anyway, e.g. for benchmarks)')
    print(f'kdflax export: error: {e}{hint}', file=sys.stderr)
    return 1
  except OSError as e:
    from kdflax.atomic import os_error_line
    print(f'kdflax export: error: {os_error_line(e)}', file=sys.stderr)
    return 1


def _photos(args: argparse.Namespace, overrides: list[str], size: int,
            labels: tuple[str, ...]) -> tuple[np.ndarray | None, np.ndarray | None,
                                              np.ndarray | None, str | None]:
  """-> (calibration, eval images, eval labels, description of the eval photos)."""
  if args.config:
    from kdflax.config import load_config
    from kdflax.data.photos import describe_source, split_photos
    from kdflax.data.pipeline import source_from_config
    data = load_config(args.config, overrides).data
    source = source_from_config(data)  # one source for both splits: TFDS is read once
    calib, _, _ = split_photos(source, data.train_split, size, args.num_calibration)
    print(f'calibration: {len(calib)} photos of {describe_source(source)} {data.train_split}',
          file=sys.stderr)
    if not data.eval_split:
      return calib, None, None, None
    images, idx, classes = split_photos(source, data.eval_split, size, args.num_eval)
    where = f'{describe_source(source)} {data.eval_split}'
    print(f'eval: {len(images)} labelled photos of {where}', file=sys.stderr)
    return calib, images, to_model_labels(idx, classes, labels, where), where
  calib = eval_images = eval_labels = None
  if args.calibration:
    from kdflax.export.images import sample_images
    calib = sample_images(args.calibration, size, args.num_calibration)
    print(f'calibration: {len(calib)} images from {args.calibration}', file=sys.stderr)
  if args.eval_dir:
    eval_images, eval_labels = _eval_set(args.eval_dir, size, args.num_eval, labels)
    print(f'eval: {len(eval_images)} labelled images from {args.eval_dir}', file=sys.stderr)
  return calib, eval_images, eval_labels, args.eval_dir


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  from kdflax.export.export_model import export_model

  module, variables, size, labels, name, source = _load(args)
  calib, eval_images, eval_labels, eval_source = _photos(args, overrides, size, labels)
  if args.model and calib is not None and 'batch_stats' in variables:
    from kdflax.export.stand_in import calibrate_batch_stats
    variables = calibrate_batch_stats(module, variables, calib[:32])
    print('fresh weights: BatchNorm statistics set from the calibration images',
          file=sys.stderr)
  export_model(module, variables, size, args.out, precisions=args.precision,
               calibration=calib, eval_images=eval_images, eval_labels=eval_labels,
               labels=labels, model_name=name, weights=source, eval_source=eval_source,
               batch=args.batch, input_type=args.input_type, output=args.output,
               allow_mismatch=args.allow_mismatch,
               activation_percentile=args.activation_percentile, report=args.report,
               runs=args.runs)
  return 0


if __name__ == '__main__':
  sys.exit(main(['export', *sys.argv[1:]]))
