"""Activation ranges of a full-int8 `.tflite`: percentiles of the calibration activations.

    model = quantize_with_percentile_ranges(converter, percentile=99.99)   # int8 .tflite bytes

TFLite's post-training quantizer gives every int8 activation tensor the range [min, max] of
its values over the calibration photos. MobileNetV3's activations are heavy-tailed (measured
on the demo student: ranges of 30 to 70 standard deviations), so min/max spends most of the
256 levels on a handful of values and rounds everything else coarsely. Here the converter
only calibrates (`_experimental_calibrate_only`: a float model whose tensors carry their
min/max), the calibration photos are run through that model once more to sample each
tensor's values, each range becomes the [100 - p, p] percentile interval (widened to contain
0, never wider than min/max), and TFLite's own MLIR quantizer (`mlir_quantize`, what
`converter.convert()` calls after calibrating) writes the int8 model from the edited ranges.
`percentile=100` gives exactly the converter's min/max model.

Both entry points used here are the converter's own, but not public API
(`tensorflow.lite.python.convert.mlir_quantize`, `TFLiteConverter._experimental_calibrate_only`):
checked against the pinned tensorflow by `tests/int8_ranges_test.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from ai_edge_litert.tools import flatbuffer_utils

# Values kept per tensor and calibration photo: percentiles come from the pooled samples.
SAMPLES_PER_IMAGE = 4096


def calibrated_model(converter) -> bytes:
  """The converter's float model with per-tensor min/max statistics (int8 settings set)."""
  converter._experimental_calibrate_only = True  # noqa: SLF001 - see the module docstring
  try:
    return converter.convert()
  finally:
    converter._experimental_calibrate_only = False  # noqa: SLF001


def _ranged_tensors(model) -> dict[int, object]:
  """`{tensor index: tensor}` of subgraph 0's tensors that carry one (min, max) pair."""
  graph = model.subgraphs[0]
  inputs = set(int(i) for i in graph.inputs)
  out = {}
  for index, tensor in enumerate(graph.tensors):
    q = tensor.quantization
    if index in inputs or q is None or q.min is None or q.max is None:
      continue
    if len(q.min) == 1 and len(q.max) == 1:
      out[index] = tensor
  return out


def activation_samples(calibrated: bytes, batches: Iterable[np.ndarray],
                       per_image: int = SAMPLES_PER_IMAGE, seed: int = 0
                       ) -> dict[int, np.ndarray]:
  """Runs `calibrated` on each input batch; `{tensor index: sampled values (float32, 1-D)}`.

  Each batch is `(B, S, S, 3)` in the model's input dtype. At most `per_image * B` values per
  tensor and batch are kept (a fixed-seed random subset), so memory stays bounded for large
  models; a tensor's exact min and max are always among them.
  """
  from ai_edge_litert.interpreter import Interpreter

  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
  wanted = sorted(_ranged_tensors(model))
  with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": wanted here
    warnings.simplefilter('ignore', UserWarning)
    interpreter = Interpreter(model_content=bytes(calibrated),
                              experimental_preserve_all_tensors=True)
  interpreter.allocate_tensors()
  source = interpreter.get_input_details()[0]
  rng = np.random.default_rng(seed)
  pooled: dict[int, list[np.ndarray]] = {i: [] for i in wanted}
  for batch in batches:
    interpreter.set_tensor(source['index'], np.asarray(batch, source['dtype']))
    interpreter.invoke()
    keep = per_image * len(batch)
    for index in wanted:
      try:
        values = np.asarray(interpreter.get_tensor(index), np.float32).ravel()
      except ValueError:  # a tensor the interpreter does not materialise
        continue
      if values.size > keep:
        extremes = values[[int(values.argmin()), int(values.argmax())]]
        values = np.concatenate([rng.choice(values, keep - 2, replace=False), extremes])
      pooled[index].append(values)
  return {i: np.concatenate(v) for i, v in pooled.items() if v}


def percentile_ranges(samples: Mapping[int, np.ndarray], percentile: float
                      ) -> dict[int, tuple[float, float]]:
  """`{tensor: (low, high)}`: the [100 - p, p] percentiles of each tensor, widened to hold 0.

  Non-finite values are ignored; a tensor without finite values gets no entry.
  """
  if not 50.0 < percentile <= 100.0:
    raise ValueError(f'percentile must be in (50, 100], got {percentile}')
  out = {}
  for index, values in samples.items():
    values = values[np.isfinite(values)]
    if not values.size:  # nothing to go by: the converter's min/max stays
      continue
    low, high = np.percentile(values.astype(np.float64), [100.0 - percentile, percentile])
    out[index] = (min(float(low), 0.0), max(float(high), 0.0))
  return out


def with_ranges(calibrated: bytes, ranges: Mapping[int, tuple[float, float]]) -> bytes:
  """`calibrated` with the given tensors' (min, max) replaced, each clipped to its old range."""
  model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
  tensors = _ranged_tensors(model)
  for index, (low, high) in ranges.items():
    q = tensors[index].quantization
    q.min = [max(float(low), float(q.min[0]))]
    q.max = [min(float(high), float(q.max[0]))]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def quantize(calibrated: bytes, input_type, output_type) -> bytes:
  """TFLite's MLIR quantizer on a calibrated model (per-channel weights, int8 activations).

  `input_type` / `output_type`: the `tf.DType` of the model's input and output (e.g.
  `tf.uint8`, `tf.float32`), as `converter.inference_input_type` / `inference_output_type`.
  """
  from tensorflow.lite.python import convert as tflite_convert
  return tflite_convert.mlir_quantize(calibrated, disable_per_channel=False,
                                      input_data_type=input_type, output_data_type=output_type)


def _calibration_batches(converter) -> Iterator[np.ndarray]:
  """The converter's own representative batches, iterated once more."""
  dataset = converter.representative_dataset
  generate = getattr(dataset, 'input_gen', dataset)  # convert() wraps the callable
  for inputs in generate():
    yield inputs[0]


def quantize_with_percentile_ranges(converter, percentile: float) -> bytes:
  """Full-int8 `.tflite` bytes from a converter set up for int8 post-training quantization.

  `converter` has its `representative_dataset`, int8 ops and input/output types set;
  its representative batches are run once more through the calibrated model to sample
  activations.
  """
  calibrated = calibrated_model(converter)
  if percentile < 100.0:
    samples = activation_samples(calibrated, _calibration_batches(converter))
    calibrated = with_ranges(calibrated, percentile_ranges(samples, percentile))
  return quantize(calibrated, converter.inference_input_type, converter.inference_output_type)
