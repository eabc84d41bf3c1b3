"""Where an int8 `.tflite` loses accuracy: the error of every int8 activation, layer by layer.

    .venv/bin/python tools/int8_errors.py --checkpoint runs/beans/matrix/baseline_s0/model_best \
        --config configs/beans_pretrained.py --activation_percentile 99.9

Converts the model as `kdflax export` does (calibrated on the config's train photos), runs
the calibrated float model and the int8 model on the eval photos with every tensor kept, and
prints, in graph order, each int8 activation's relative RMS error against the float tensor of
the same name (`||dequant(q) - f|| / ||f||`, pooled over the photos) with its scale, then the
top-1 agreement of the two models. An error that jumps at one tensor names the layer to look
at; one that grows a little at every layer is the per-tensor activation ranges themselves.
Diagnostic only: it reaches into the converter's private helpers, as `kdflax.export` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdflax.config import load_config  # noqa: E402
from kdflax.data.photos import split_photos  # noqa: E402
from kdflax.data.pipeline import source_from_config  # noqa: E402
from kdflax.export import converter as conv  # noqa: E402
from kdflax.export import int8_ranges  # noqa: E402
from kdflax.export.serving import serving_function  # noqa: E402
from kdflax.train.checkpoint import load_model  # noqa: E402


def _interpreter(model: bytes):
  from ai_edge_litert.interpreter import Interpreter
  with warnings.catch_warnings():  # preserve_all_tensors warns that it is for debugging
    warnings.simplefilter('ignore')
    interpreter = Interpreter(model_content=bytes(model), experimental_preserve_all_tensors=True)
  interpreter.allocate_tensors()
  return interpreter


def _run(interpreter, image: np.ndarray) -> np.ndarray:
  source = interpreter.get_input_details()[0]
  interpreter.set_tensor(source['index'], image.astype(source['dtype']))
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])


def tensor_errors(float_model: bytes, int8_model: bytes, images: np.ndarray
                  ) -> tuple[list[tuple[int, str, float, float]], float]:
  """`([(index, name, relative RMS error, scale)], top-1 agreement)` over `images` (N, S, S, 3).

  Tensors are matched by name; int8 tensors without a float twin of the same shape are
  skipped, as are constants (scale 0).
  """
  fi, qi = _interpreter(float_model), _interpreter(int8_model)
  floats = {d['name']: d for d in fi.get_tensor_details()}
  sums: dict[str, list] = {}
  agree = 0
  for image in images:
    agree += int(_run(fi, image[None]).argmax() == _run(qi, image[None]).argmax())
    for detail in qi.get_tensor_details():
      name, (scale, zero) = detail['name'], detail['quantization']
      if detail['dtype'] != np.int8 or name not in floats or not scale:
        continue
      try:
        f = fi.get_tensor(floats[name]['index']).astype(np.float64)
        q = (qi.get_tensor(detail['index']).astype(np.float64) - zero) * scale
      except ValueError:  # a tensor the interpreter does not keep
        continue
      if f.shape == q.shape:
        entry = sums.setdefault(name, [detail['index'], 0.0, 0.0, scale])
        entry[1] += float(((q - f) ** 2).sum())
        entry[2] += float((f ** 2).sum())
  rows = sorted((index, name, (err / max(ref, 1e-30)) ** 0.5, scale)
                for name, (index, err, ref, scale) in sums.items())
  return rows, agree / len(images)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='model directory')
  parser.add_argument('--config', required=True, help='its data: train = calibration, eval')
  parser.add_argument('--activation_percentile', type=float, default=99.9)
  parser.add_argument('--num_calibration', type=int, default=1034)
  parser.add_argument('--num_eval', type=int, default=64)
  args = parser.parse_args()

  config = load_config(args.config, [])
  info, variables = load_model(args.checkpoint)
  module, size = info.create()
  source = source_from_config(config.data)
  calibration, _, _ = split_photos(source, config.data.train_split, size, args.num_calibration)
  images, _, _ = split_photos(source, config.data.eval_split, size, args.num_eval)
  fn = serving_function(module, variables, 'uint8')
  holder, concrete = conv._concrete_function(fn, size, 1, 'uint8', 'probabilities')  # noqa: SLF001
  converter = conv._tflite_converter(holder, concrete, 'int8', 1, 'uint8', calibration)  # noqa: SLF001
  calibrated = int8_ranges.calibrated_model(converter)  # the float twin, with its min/max
  int8 = int8_ranges.quantize_with_percentile_ranges(converter, args.activation_percentile)
  rows, agreement = tensor_errors(calibrated, int8, images)
  print('| tensor | relative RMS error | scale | name |\n|---:|---:|---:|---|')
  for index, name, error, scale in rows:
    print(f'| {index} | {error:.3f} | {scale:.4g} | {name.split(";")[0][:90]} |')
  print(f'\ntop-1 agreement int8 vs float on {len(images)} eval photos: {agreement:.1%} '
        f'(activation percentile {args.activation_percentile})')


if __name__ == '__main__':
  main()
