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
    `flatbuffer_edits.dequantize_uint8_inputs`). (`input_type='float32'` gives a float 0..1
    input.)
  - builtin TFLite ops only (no Flex / SELECT_TF_OPS, no custom ops): checked, else an error.
  - fp16: float16 weights, float compute. int8: full-integer quantization (per-channel
    weights, int8 activations) calibrated on the given REAL images (activation ranges: their
    min/max, or with `activation_percentile` a percentile interval, `int8_ranges.py`); the
    uint8 input and float32 output are converted at the graph's two ends.
  - standard TFLite Model Metadata (`model_metadata.py`, written with MediaPipe's writer):
    name / description / version, the input as an RGB image, the output as a classification
    tensor with the labels as a TENSOR_AXIS_LABELS file packed inside the `.tflite`, so
    MediaPipe Tasks `ImageClassifier` runs it as is; also kdflax's own entry `kdflax` (JSON:
    labels, input format, output kind, precision, model name), and `NAME.labels.txt` beside
    the file (one class per line) when labels are given.

Conversion: the serving function (`serving.py`), re-expressed with the ops LiteRT runs fast
(`lowering.py`), is lowered with `jax2tf` and converted by the TFLite converter
(`converter.py`). The `.tflite` is then run in a child
process (`isolated.py`) on the parity images and compared with JAX (`parity.py`); the file
appears at `out_path` (atomic rename) only if conversion, the interpreter and parity all
succeed, or parity fails with `allow_mismatch=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdflax import atomic
from kdflax.export import flatbuffer_edits, inventory, lowering
from kdflax.export.converter import (
    DEFAULT_ACTIVATION_PERCENTILE,
    PRECISIONS,
    ExportError,
    convert,
    first_line,
)
from kdflax.export.interpreter import (
  INPUT_NAME,
  METADATA_NAME,
  SIGNATURE_KEY,
  labels_path,
)
from kdflax.export.isolated import InterpreterCrash, run_isolated
from kdflax.export.model_metadata import write_standard_metadata
from kdflax.export.parity import ParityResult, compare_logits
from kdflax.export.serving import int8_blockers, jax_logits, serving_function


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


@dataclasses.dataclass(frozen=True)
class _FileSpec:
  """What the file takes and gives: `(batch, S, S, 3)` `input_type` -> `(batch, K)` `output`."""

  image_size: int   # S
  precision: str    # 'fp32', 'fp16' or 'int8'
  batch: int
  input_type: str   # 'uint8' or 'float32'
  output: str       # 'probabilities' or 'logits'
  activation_percentile: float | None = DEFAULT_ACTIVATION_PERCENTILE   # int8 ranges


def export_tflite(module: nn.Module, variables: Mapping[str, Any], image_size: int,
                  out_path: str | os.PathLike, precision: str = 'fp32',
                  calibration_images: np.ndarray | None = None,
                  parity_images: np.ndarray | None = None, batch: int = 1,
                  labels: Sequence[str] = (), input_type: str = 'uint8',
                  allow_mismatch: bool = False, model_name: str = '',
                  on_mismatch: Callable[[ParityResult], None] | None = None,
                  output: str = 'probabilities', version: str = '',
                  description: str = '',
                  activation_percentile: float | None = DEFAULT_ACTIVATION_PERCENTILE
                  ) -> ExportResult:
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
    activation_percentile: int8 only: each activation tensor's range is this percentile
      interval of its calibration values (e.g. 99.99; 100: their min/max in two passes;
      None, the default: the converter's own min/max calibration), see
      `kdflax.export.int8_ranges`.

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
  num_classes = _checked_num_classes(fn, example, precision, labels, calibration_images)
  parity_images = _checked_parity_images(parity_images, calibration_images, image_size)
  spec = _FileSpec(image_size, precision, batch, input_type, output, activation_percentile)
  model = _converted(module, variables, fn, spec, calibration_images)
  model = _with_metadata(model, spec, num_classes, labels, model_name, version, description)
  parity = _write_checked(model, out_path, fn, spec, parity_images, allow_mismatch,
                          on_mismatch)
  sidecar = _write_labels(out_path, labels)
  return ExportResult(path=out_path, precision=precision, num_classes=num_classes,
                      size_mb=len(model) / 1e6,
                      ops=inventory.op_histogram(model), parity=parity,
                      labels_path=sidecar, output=output)


def _checked_num_classes(fn: Callable, example: jax.ShapeDtypeStruct, precision: str,
                         labels: Sequence[str], calibration_images: np.ndarray | None) -> int:
  """K of the `(B, K)` output, after checking the labels and what int8 export needs.

  Raises:
    ExportError: `fn` does not run on `example`; at int8, an int8-incapable op or no
      calibration images.
    ValueError: the number of labels is not K.
  """
  try:
    out_shape = jax.eval_shape(fn, example)
  except Exception as e:  # noqa: BLE001
    raise ExportError(f'the model does not run on {example.shape} {example.dtype} input: '
                      f'{first_line(e)}') from None
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
  return num_classes


def _checked_parity_images(parity_images: np.ndarray | None,
                           calibration_images: np.ndarray | None,
                           image_size: int) -> np.ndarray:
  """The parity set (given, else the calibration images, else 8 fixed random images).

  Raises:
    ValueError: the calibration or parity images are not `(N, S, S, 3)`.
  """
  if parity_images is None:
    parity_images = calibration_images
  if parity_images is None or not len(parity_images):
    parity_images = np.random.default_rng(0).integers(
        0, 256, (8, image_size, image_size, 3), dtype=np.uint8)
  for name, arr in (('calibration_images', calibration_images), ('parity_images', parity_images)):
    if arr is not None and np.asarray(arr).shape[1:] != (image_size, image_size, 3):
      raise ValueError(f'{name}: expected (N, {image_size}, {image_size}, 3) uint8, '
                       f'got {np.asarray(arr).shape}')
  return parity_images


def _converted(module: nn.Module, variables: Mapping[str, Any], fn: Callable,
               spec: _FileSpec, calibration_images: np.ndarray | None) -> bytes:
  """The `.tflite` bytes of `fn`, lowered for the precision and edited for LiteRT, no metadata."""
  # Same function, re-expressed with ops LiteRT runs fast at this precision (lowering.py);
  # the JAX reference still uses `fn` itself. At int8 the softmax is not converted (it
  # would be an int8 SOFTMAX: 1/256 steps, off XNNPACK) but appended in float after the
  # output's DEQUANTIZE (`flatbuffer_edits.append_softmax`).
  float_softmax = spec.precision == 'int8' and spec.output == 'probabilities'
  converted_fn = serving_function(module, variables, spec.input_type, 'logits') \
      if float_softmax else fn
  export_fn = lowering.for_precision(converted_fn, spec.precision)
  model = convert(export_fn, spec.image_size, spec.precision, spec.batch, spec.input_type,
                  calibration_images, output_name=spec.output,
                  activation_percentile=spec.activation_percentile)
  if float_softmax:
    model = flatbuffer_edits.append_softmax(model)
  if spec.input_type == 'uint8':
    model = flatbuffer_edits.dequantize_uint8_inputs(model)  # vectorised uint8 -> float
  return model


def _kdflax_entry(spec: _FileSpec, num_classes: int, labels: Sequence[str],
                  model_name: str) -> dict[str, Any]:
  """kdflax's own metadata entry (JSON; read back by `interpreter.read_model_metadata`)."""
  batch, size, input_type = spec.batch, spec.image_size, spec.input_type
  meta = {
      'format': 'kdflax-tflite/1', 'model': model_name, 'precision': spec.precision,
      'signature': SIGNATURE_KEY,
      'input': {'name': INPUT_NAME, 'shape': [batch, size, size, 3],
                'dtype': input_type, 'range': [0, 255] if input_type == 'uint8' else [0, 1],
                'layout': 'NHWC', 'channels': 'RGB',
                'resize': 'centre square of side short * S / max(S, floor(S / 0.875)), '
                          'bilinear to S x S as MediaPipe samples a region of interest'},
      'output': {'name': spec.output, 'shape': [batch, num_classes], 'dtype': 'float32',
                 'kind': spec.output},
      'num_classes': num_classes, 'labels': list(labels),
  }
  if input_type == 'float32':
    meta['input_scale'] = 1.0 / 255.0
  return meta


def _with_metadata(model: bytes, spec: _FileSpec, num_classes: int, labels: Sequence[str],
                   model_name: str, version: str, description: str) -> bytes:
  """`model` with kdflax's JSON entry, then the standard metadata and its packed labels.

  Raises:
    ExportError: the standard metadata writer failed.
  """
  meta = _kdflax_entry(spec, num_classes, labels, model_name)
  model = flatbuffer_edits.add_metadata(model, METADATA_NAME, json.dumps(meta).encode())
  # Last: the standard metadata's packed label file is a zip appended to the flatbuffer,
  # which re-serialising the model (add_metadata) would drop.
  try:
    return write_standard_metadata(
        model, name=model_name or 'kdflax classifier',
        description=description or (
            f'{model_name or "kdflax"} image classifier ({num_classes} classes, '
            f'{spec.precision}, {spec.image_size} px); input: the photo\'s centre box (kdflax '
            f'eval view) as RGB {spec.input_type}; output: class {spec.output}.'),
        version=version or f'{spec.precision}', labels=labels, input_type=spec.input_type,
        output=spec.output)
  except RuntimeError as e:
    raise ExportError(str(e)) from None


def _write_checked(model: bytes, out_path: str, fn: Callable, spec: _FileSpec,
                   parity_images: np.ndarray, allow_mismatch: bool,
                   on_mismatch: Callable[[ParityResult], None] | None) -> ParityResult:
  """Writes `model` to `out_path` (atomically) if it runs in LiteRT and agrees with `fn`.

  Raises:
    ExportError: the interpreter crashed, or parity failed without `allow_mismatch`;
      `out_path` is then left as it was.
  """
  with atomic.staged_file(out_path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(model)
    try:
      got = run_isolated(tmp, parity_images)
    except InterpreterCrash as e:
      raise ExportError(f'{spec.precision} model does not run in LiteRT: '
                        f'{str(e).replace(tmp, os.path.basename(out_path))}') from None
    want = jax_logits(fn, parity_images, spec.batch, spec.input_type)
    parity = compare_logits(spec.precision, got, want)
    if not parity.passed:
      if not allow_mismatch:
        raise ExportError(f'{out_path}: {parity.summary()} (pass allow_mismatch / '
                          '--allow-mismatch to write it anyway)')
      if on_mismatch is not None:
        on_mismatch(parity)
  return parity


def _write_labels(out_path: str, labels: Sequence[str]) -> str | None:
  """Writes (or, without labels, removes) the `NAME.labels.txt` sidecar; its path or None."""
  sidecar = labels_path(out_path)
  if labels:
    atomic.write_text(sidecar, ''.join(f'{name}\n' for name in labels))
  else:
    atomic.remove_file(sidecar)  # a stale sidecar from an earlier export would mislabel this model
  return sidecar if labels else None
