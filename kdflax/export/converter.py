"""Serving function -> `.tflite` bytes: jax2tf lowering, then the TFLite converter.

    model = convert(fn, image_size=224, precision='int8', calibration_images=photos)

The function is lowered with `jax2tf` (native StableHLO serialization, static shapes) inside a
`tf.function` with a named input signature, then converted with
`tf.lite.TFLiteConverter.from_concrete_functions`, TFLite builtin ops only. A converter failure
or a non-builtin op in the result is an `ExportError` with a one-line message; the converter's
native log output is dropped unless KDFLAX_EXPORT_VERBOSE=1. int8 activation ranges are the
converter's min/max, or with `activation_percentile` a percentile interval of the calibration
activations (`int8_ranges.py`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from kdflax.export import int8_ranges, inventory
from kdflax.export.interpreter import INPUT_NAME
from kdflax.export.serving import batched, input_array

PRECISIONS = ('fp32', 'fp16', 'int8')
# int8 activation ranges by default: the converter's own min/max calibration (None). A
# percentile such as 99.99 (`int8_ranges.py`) halved the int8 error of the demo's students but
# flipped a confident prediction of an over-fit one (docs/export.md), so it is opt-in.
DEFAULT_ACTIVATION_PERCENTILE = None


class ExportError(RuntimeError):
  """The model cannot be exported as asked; the message says why in one line."""


def convert(fn: Callable, image_size: int, precision: str = 'fp32', batch: int = 1,
            input_type: str = 'uint8', calibration_images: np.ndarray | None = None,
            output_name: str = 'logits',
            activation_percentile: float | None = DEFAULT_ACTIVATION_PERCENTILE) -> bytes:
  """Converts a serving function to `.tflite` bytes (builtin ops only); no checks run.

  Args:
    fn: `(batch, S, S, 3)` input -> `(batch, K)` float32, e.g. from `serving_function`.
    image_size: S.
    precision: 'fp32', 'fp16' or 'int8'.
    batch: static batch size of the exported input.
    input_type: dtype of the input (see `serving_function`).
    calibration_images: `(N, S, S, 3)` uint8 real images; required for int8.
    output_name: the signature's output name ('logits' or 'probabilities').
    activation_percentile: int8: each activation's range is this percentile interval of its
      calibration values (`int8_ranges`; 100: their min/max); None: the converter's own
      calibration in one call (also min/max).

  Raises:
    ExportError: the converter failed, or the graph needs non-builtin (Flex/custom) ops.
  """
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
  holder, concrete = _concrete_function(fn, image_size, batch, input_type, output_name)
  converter = _tflite_converter(holder, concrete, precision, batch, input_type,
                                calibration_images)
  if precision == 'int8' and activation_percentile is not None:
    model = _run_converter(converter, precision, functools.partial(
        int8_ranges.quantize_with_percentile_ranges, percentile=activation_percentile))
  else:
    model = _run_converter(converter, precision)
  bad = inventory.non_builtin_ops(model)
  if bad:
    raise ExportError(f'the converted model uses non-builtin ops {bad}; only TFLite builtins '
                      'are allowed (no Flex / SELECT_TF_OPS / custom ops)')
  return model


def _concrete_function(fn: Callable, image_size: int, batch: int, input_type: str,
                       output_name: str) -> tuple[Any, Any]:
  """`(holder, concrete function)`: `fn` via jax2tf in a `tf.function` whose input is named.

  The `tf.Module` holder keeps the function alive for the converter.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  dtype = tf.uint8 if input_type == 'uint8' else tf.float32
  spec = tf.TensorSpec((batch, image_size, image_size, 3), dtype, name=INPUT_NAME)
  converted = jax2tf.convert(fn, with_gradient=False)
  holder = tf.Module()

  @tf.function(input_signature=[spec], autograph=False)
  def serve(image):
    return {output_name: converted(image)}

  holder.serve = serve
  try:
    concrete = serve.get_concrete_function()
  except Exception as e:  # noqa: BLE001 - jax2tf raises many types
    raise ExportError(f'jax2tf could not lower the model: {first_line(e)}') from None
  return holder, concrete


def _tflite_converter(holder: Any, concrete: Any, precision: str, batch: int, input_type: str,
                      calibration_images: np.ndarray | None) -> Any:
  """A `TFLiteConverter` set up for `precision` (builtin ops; int8: calibrated, full integer)."""
  import tensorflow as tf

  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if precision == 'fp16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif precision == 'int8':
    if calibration_images is None or not len(calibration_images):
      raise ExportError('int8 export needs calibration images (a folder of real photos)')
    calib = input_array(calibration_images, input_type)

    def representative():
      for chunk in batched(calib, batch):
        yield [chunk]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if input_type == 'uint8':
      converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
  return converter


def _run_converter(converter: Any, precision: str,
                   run: Callable[[Any], bytes] | None = None) -> bytes:
  """`converter.convert()` (or `run(converter)`), its native output silenced and its failures
  one-line ExportErrors."""
  try:
    with native_stderr_silenced():
      return run(converter) if run is not None else converter.convert()
  except Exception as e:  # noqa: BLE001 - ConverterError and friends
    text = str(e)
    if 'Flex' in text or 'SELECT_TF_OPS' in text or 'select TF ops' in text.lower():
      raise ExportError(f'the model needs ops outside the TFLite builtins (Flex / '
                        f'SELECT_TF_OPS), which are not allowed: {_ops_in(text)}') from None
    hint = ''
    if 'not part of the vhlo support' in text or 'failed to legalize' in text:
      hint = ' (no TFLite builtin op implements it; Flex / SELECT_TF_OPS are not allowed)'
    raise ExportError(f'TFLite conversion ({precision}) failed: {first_line(e)}{hint}') from None


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
  """Drops what C++ code writes to fd 2 meanwhile (the converter's MLIR dumps and logs).

  The converter's exception carries the error itself; set KDFLAX_EXPORT_VERBOSE=1 to see
  the full native output.
  """
  if os.environ.get('KDFLAX_EXPORT_VERBOSE'):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, 'w') as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def first_line(e: BaseException) -> str:
  """The line of `e`'s message worth showing: a converter's `error:` line, else the first."""
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  for ln in lines:  # converter messages start with a location; prefer the 'error:' line
    if 'error:' in ln:
      return ln[ln.index('error:'):]
  return lines[0] if lines else type(e).__name__


def _ops_in(text: str) -> str:
  for ln in text.splitlines():
    if 'ops' in ln.lower() and ('tf.' in ln or 'Flex' in ln):
      return ln.strip()
  return first_line(RuntimeError(text))
