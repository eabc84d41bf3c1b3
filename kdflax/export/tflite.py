"""Flax classifier -> `.tflite` for phones (fp32, fp16 or full int8), checked against JAX.

    result = export_tflite(module, variables, image_size=224, out_path='student.tflite',
                           precision='int8', calibration_images=imgs, labels=names)
    result.parity.summary()   # 'int8 parity ok: top-1 agrees with JAX on 100.0% of 48 images'

The exported model (every precision):
  - signature `serving_default`: input `image` `(batch, S, S, 3)` uint8 RGB 0..255 (NHWC, the
    photo's evaluation view), output `probabilities` `(batch, K)` float32 (softmax inside the
    graph; `output='logits'` exports the logits instead, output `logits`). Scaling to [0, 1]
    and the model's own mean/std normalisation are inside the graph, so an app feeds raw
    pixels (the centre box `view.eval_roi`, sampled as MediaPipe samples a region of
    interest; `images.load_image` / `view.eval_view` produce the same array). The
    uint8 input carries the identity quantization (scale 1, zero point 0) and enters the graph
    through DEQUANTIZE, which XNNPACK vectorises (a CAST there runs on LiteRT's scalar kernel;
    `flatbuffer_edits.dequantize_uint8_inputs`). (`input_type='float32'` gives a float 0..1 input.)
  - builtin TFLite ops only (no Flex / SELECT_TF_OPS, no custom ops): checked, else an error.
  - fp16: float16 weights, float compute. int8: full-integer quantization (per-channel
    weights, int8 activations) calibrated on the given REAL images; the uint8 input and
    float32 output are converted at the graph's two ends.
  - standard TFLite Model Metadata (`model_metadata.py`, written with MediaPipe's writer):
    name / description / version, the input as an RGB image, the output as a classification
    tensor with the labels as a TENSOR_AXIS_LABELS file packed inside the `.tflite`, so
    MediaPipe Tasks `ImageClassifier` runs it as is; also kdflax's own entry `kdflax` (JSON:
    labels, input format, output kind, precision, model name), and `NAME.labels.txt` beside
    the file (one class per line) when labels are given.

Conversion: the serving function is lowered with `jax2tf` (native StableHLO serialization,
static shapes) inside a `tf.function` with a named input signature, then
`tf.lite.TFLiteConverter.from_concrete_functions`. The `.tflite` is then run in a child
process (`isolated.py`) on the parity images and compared with JAX (`parity.py`); the file
appears at `out_path` (atomic rename) only if conversion, the interpreter and parity all
succeed, or parity fails with `allow_mismatch=True`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from kdflax import atomic
from kdflax.export import flatbuffer_edits, inventory, lowering
from kdflax.export.interpreter import (
  INPUT_NAME,
  METADATA_NAME,
  SIGNATURE_KEY,
  labels_path,
)
from kdflax.export.isolated import InterpreterCrash, run_isolated
from kdflax.export.model_metadata import OUTPUTS, write_standard_metadata
from kdflax.export.parity import ParityResult, compare_logits
from kdflax.models.depthwise import reference_form

PRECISIONS = ('fp32', 'fp16', 'int8')
INPUT_TYPES = ('uint8', 'float32')
# JAX primitives the TFLite converter turns into float-only polynomials: at int8 they convert,
# then the interpreter aborts the process (docs/export.md), so they are refused up front.
INT8_BLOCKERS = {
    'erf': 'erf (exact GELU)',
    'erfc': 'erfc (exact GELU)',
    'erf_inv': 'erf_inv',
    'lgamma': 'lgamma',
    'digamma': 'digamma',
}


class ExportError(RuntimeError):
  """The model cannot be exported as asked; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export_tflite` wrote and how it checked out."""

  path: str
  precision: str
  num_classes: int
  size_mb: float
  ops: Mapping[str, int]          # op name -> count in the main subgraph
  parity: ParityResult
  labels_path: str | None
  output: str = 'probabilities'   # what the file outputs: 'probabilities' or 'logits'


def serving_function(module: nn.Module, variables: Mapping[str, Any],
                     input_type: str = 'uint8', output: str = 'logits'
                     ) -> Callable[[jax.Array], jax.Array]:
  """The function that gets exported: raw image batch -> logits or probabilities.

  `input_type='uint8'`: `(B, S, S, 3)` uint8 0..255; `'float32'`: float 0..1. Returns
  `(B, K)` float32 of `module` in eval mode with `variables` baked in as constants: the
  logits (`output='logits'`, the default here) or their softmax (`'probabilities'`, what
  `export_tflite` exports by default).
  """
  if input_type not in INPUT_TYPES:
    raise ValueError(f'input_type must be one of {INPUT_TYPES}, got {input_type!r}')
  if output not in OUTPUTS:
    raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
  variables = jax.tree.map(jnp.asarray, dict(variables))
  module = reference_form(module)  # grouped convolutions -> TFLite DEPTHWISE_CONV_2D

  def fn(image):
    x = image.astype(jnp.float32)
    if input_type == 'uint8':
      x = x * (1.0 / 255.0)
    logits = module.apply(variables, x, train=False).astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if output == 'probabilities' else logits

  return fn


def _primitives(jaxpr) -> Iterator[str]:
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _primitives(sub)


def int8_blockers(fn: Callable, example: jax.ShapeDtypeStruct) -> list[str]:
  """Names of the ops in `fn` that a full-int8 TFLite graph cannot run (see `INT8_BLOCKERS`)."""
  closed = jax.make_jaxpr(fn)(example)
  return sorted({INT8_BLOCKERS[p] for p in _primitives(closed.jaxpr) if p in INT8_BLOCKERS})


def _input_array(images: np.ndarray, input_type: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 RGB 0..255, got {images.dtype}')
  return images if input_type == 'uint8' else images.astype(np.float32) / 255.0


def _batched(images: np.ndarray, batch: int) -> Iterator[np.ndarray]:
  """Chunks of exactly `batch` images (the last one padded by repeating its last image)."""
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    if len(chunk) < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
    yield chunk


def convert(fn: Callable, image_size: int, precision: str = 'fp32', batch: int = 1,
            input_type: str = 'uint8', calibration_images: np.ndarray | None = None,
            output_name: str = 'logits') -> bytes:
  """Converts a serving function to `.tflite` bytes (builtin ops only); no checks run.

  Args:
    fn: `(batch, S, S, 3)` input -> `(batch, K)` float32, e.g. from `serving_function`.
    image_size: S.
    precision: 'fp32', 'fp16' or 'int8'.
    batch: static batch size of the exported input.
    input_type: dtype of the input (see `serving_function`).
    calibration_images: `(N, S, S, 3)` uint8 real images; required for int8.
    output_name: the signature's output name ('logits' or 'probabilities').

  Raises:
    ExportError: the converter failed, or the graph needs non-builtin (Flex/custom) ops.
  """
  import tensorflow as tf
  from jax.experimental import jax2tf

  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
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
    raise ExportError(f'jax2tf could not lower the model: {_first_line(e)}') from None
  converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if precision == 'fp16':
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
  elif precision == 'int8':
    if calibration_images is None or not len(calibration_images):
      raise ExportError('int8 export needs calibration images (a folder of real photos)')
    calib = _input_array(calibration_images, input_type)

    def representative():
      for chunk in _batched(calib, batch):
        yield [chunk]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if input_type == 'uint8':
      converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
  try:
    with _native_stderr_silenced():
      model = converter.convert()
  except Exception as e:  # noqa: BLE001 - ConverterError and friends
    text = str(e)
    if 'Flex' in text or 'SELECT_TF_OPS' in text or 'select TF ops' in text.lower():
      raise ExportError(f'the model needs ops outside the TFLite builtins (Flex / '
                        f'SELECT_TF_OPS), which are not allowed: {_ops_in(text)}') from None
    hint = ''
    if 'not part of the vhlo support' in text or 'failed to legalize' in text:
      hint = ' (no TFLite builtin op implements it; Flex / SELECT_TF_OPS are not allowed)'
    raise ExportError(f'TFLite conversion ({precision}) failed: {_first_line(e)}{hint}') from None
  bad = inventory.non_builtin_ops(model)
  if bad:
    raise ExportError(f'the converted model uses non-builtin ops {bad}; only TFLite builtins '
                      'are allowed (no Flex / SELECT_TF_OPS / custom ops)')
  return model


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
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


def _first_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  for ln in lines:  # converter messages start with a location; prefer the 'error:' line
    if 'error:' in ln:
      return ln[ln.index('error:'):]
  return lines[0] if lines else type(e).__name__


def _ops_in(text: str) -> str:
  for ln in text.splitlines():
    if 'ops' in ln.lower() and ('tf.' in ln or 'Flex' in ln):
      return ln.strip()
  return _first_line(RuntimeError(text))


def jax_logits(fn: Callable, images: np.ndarray, batch: int = 1,
               input_type: str = 'uint8') -> np.ndarray:
  """`(N, S, S, 3)` uint8 -> `(N, K)` outputs of the serving function (logits or
  probabilities, whichever it returns), in `batch`-sized calls."""
  x = _input_array(images, input_type)
  jitted = jax.jit(fn)
  out = [np.asarray(jitted(chunk)) for chunk in _batched(x, batch)]
  return np.concatenate(out)[:len(images)]


def export_tflite(module: nn.Module, variables: Mapping[str, Any], image_size: int,
                  out_path: str | os.PathLike, precision: str = 'fp32',
                  calibration_images: np.ndarray | None = None,
                  parity_images: np.ndarray | None = None, batch: int = 1,
                  labels: Sequence[str] = (), input_type: str = 'uint8',
                  allow_mismatch: bool = False, model_name: str = '',
                  on_mismatch: Callable[[ParityResult], None] | None = None,
                  output: str = 'probabilities', version: str = '',
                  description: str = '') -> ExportResult:
  """Converts `module` to a `.tflite` at `out_path`, checks it against JAX, writes it atomically.

  Args:
    module, variables: a classifier taking `(B, S, S, 3)` float [0, 1] and returning logits.
      The file outputs their softmax (`output='probabilities'`, default) or the logits.
    image_size: S, the static input resolution.
    out_path: destination `.tflite`; only ever replaced by a complete, checked file.
    precision: 'fp32', 'fp16' or 'int8'.
    calibration_images: `(N, S, S, 3)` uint8 real photos; required for int8 (representative
      set), also the default parity set.
    parity_images: `(N, S, S, 3)` uint8 images for the JAX comparison; defaults to the
      calibration images, else 8 fixed random images.
    batch: static batch of the exported input.
    labels: class names (stored in the file and in `NAME.labels.txt`); empty for none.
    input_type: 'uint8' (raw pixels, default) or 'float32' (0..1).
    allow_mismatch: write the file even when parity fails (the result says it failed).
    model_name: recorded in the file's metadata.
    on_mismatch: called with the failed parity result when `allow_mismatch` lets it pass.
    output: 'probabilities' (softmax in the graph, default) or 'logits'. Parity compares
      JAX and the file on this output.
    version, description: the standard metadata's model version and description (defaults:
      the precision and the model name, and a generated sentence).

  Raises:
    ExportError: conversion failed, a non-builtin or int8-incapable op, the interpreter
      crashed, or parity failed without `allow_mismatch`. Nothing is left at `out_path`.
  """
  out_path = os.path.abspath(os.fspath(out_path))
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}')
  fn = serving_function(module, variables, input_type, output)
  example = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                 jnp.uint8 if input_type == 'uint8' else jnp.float32)
  try:
    out_shape = jax.eval_shape(fn, example)
  except Exception as e:  # noqa: BLE001
    raise ExportError(f'the model does not run on {example.shape} {example.dtype} input: '
                      f'{_first_line(e)}') from None
  num_classes = int(out_shape.shape[-1])
  if labels and len(labels) != num_classes:
    raise ValueError(f'{len(labels)} labels for a model with {num_classes} classes')
  if precision == 'int8':
    blockers = int8_blockers(fn, example)
    if blockers:
      raise ExportError(
          f'int8 export is not possible: the model uses {", ".join(blockers)}, which TFLite '
          'lowers to a float polynomial that the LiteRT interpreter cannot run at int8 (it '
          'aborts); export fp16 or fp32 instead, or use tanh-approximate GELU')
    if calibration_images is None or not len(calibration_images):
      raise ExportError('int8 export needs calibration_images: real photos (--calibration DIR)')
  if parity_images is None:
    parity_images = calibration_images
  if parity_images is None or not len(parity_images):
    parity_images = np.random.default_rng(0).integers(
        0, 256, (8, image_size, image_size, 3), dtype=np.uint8)
  for name, arr in (('calibration_images', calibration_images), ('parity_images', parity_images)):
    if arr is not None and np.asarray(arr).shape[1:] != (image_size, image_size, 3):
      raise ValueError(f'{name}: expected (N, {image_size}, {image_size}, 3) uint8, '
                       f'got {np.asarray(arr).shape}')

  # Same function, re-expressed with ops LiteRT runs fast at this precision (lowering.py);
  # the JAX reference below still uses `fn` itself. At int8 the softmax is not converted
  # (it would be an int8 SOFTMAX: 1/256 steps, off XNNPACK) but appended in float after
  # the output's DEQUANTIZE (`flatbuffer_edits.append_softmax`).
  float_softmax = precision == 'int8' and output == 'probabilities'
  converted_fn = serving_function(module, variables, input_type, 'logits') if float_softmax \
      else fn
  export_fn = lowering.for_precision(converted_fn, precision)
  model = convert(export_fn, image_size, precision, batch, input_type, calibration_images,
                  output_name=output)
  if float_softmax:
    model = flatbuffer_edits.append_softmax(model)
  if input_type == 'uint8':
    model = flatbuffer_edits.dequantize_uint8_inputs(model)  # vectorised uint8 -> float in XNNPACK
  meta = {
      'format': 'kdflax-tflite/1', 'model': model_name, 'precision': precision,
      'signature': SIGNATURE_KEY,
      'input': {'name': INPUT_NAME, 'shape': [batch, image_size, image_size, 3],
                'dtype': input_type, 'range': [0, 255] if input_type == 'uint8' else [0, 1],
                'layout': 'NHWC', 'channels': 'RGB',
                'resize': 'centre square of side short * S / max(S, floor(S / 0.875)), '
                          'bilinear to S x S as MediaPipe samples a region of interest'},
      'output': {'name': output, 'shape': [batch, num_classes], 'dtype': 'float32',
                 'kind': output},
      'num_classes': num_classes, 'labels': list(labels),
  }
  if input_type == 'float32':
    meta['input_scale'] = 1.0 / 255.0
  model = flatbuffer_edits.add_metadata(model, METADATA_NAME, json.dumps(meta).encode())
  # Last: the standard metadata's packed label file is a zip appended to the flatbuffer,
  # which re-serialising the model (add_metadata) would drop.
  try:
    model = write_standard_metadata(
        model, name=model_name or 'kdflax classifier',
        description=description or (
            f'{model_name or "kdflax"} image classifier ({num_classes} classes, {precision}, '
            f'{image_size} px); input: the photo\'s centre box (kdflax eval view) as RGB '
            f'{input_type}; output: class {output}.'),
        version=version or f'{precision}', labels=labels, input_type=input_type,
        output=output)
  except RuntimeError as e:
    raise ExportError(str(e)) from None

  with atomic.staged_file(out_path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(model)
    try:
      got = run_isolated(tmp, parity_images)
    except InterpreterCrash as e:
      raise ExportError(f'{precision} model does not run in LiteRT: '
                        f'{str(e).replace(tmp, os.path.basename(out_path))}') from None
    want = jax_logits(fn, parity_images, batch, input_type)
    parity = compare_logits(precision, got, want)
    if not parity.passed:
      if not allow_mismatch:
        raise ExportError(f'{out_path}: {parity.summary()} (pass allow_mismatch / '
                          '--allow-mismatch to write it anyway)')
      if on_mismatch is not None:
        on_mismatch(parity)
  sidecar = labels_path(out_path)
  if labels:
    atomic.write_text(sidecar, ''.join(f'{name}\n' for name in labels))
  else:
    atomic.remove_file(sidecar)  # a stale sidecar from an earlier export would mislabel this model
  return ExportResult(path=out_path, precision=precision, num_classes=num_classes,
                      size_mb=len(model) / 1e6,
                      ops=inventory.op_histogram(model), parity=parity,
                      labels_path=sidecar if labels else None, output=output)
