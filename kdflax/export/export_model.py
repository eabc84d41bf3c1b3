"""One model -> `.tflite` at several precisions, parity-checked, measured and reported.

    report = export_model(module, variables, 224, 'out/student.tflite',
                          precisions=('fp32', 'int8'), calibration=calib_images,
                          eval_images=val_images, eval_labels=val_labels, labels=names)
    report['exports'][1]['accuracy']      # int8 top-1 on the eval images

`kdflax export` and `kdflax pipeline` call this with images from a folder or from the
configured data source (`kdflax.data.photos.split_photos`); the images are uint8 evaluation
views `(N, S, S, 3)` (`kdflax.data.eval_view`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from kdflax.export.converter import DEFAULT_ACTIVATION_PERCENTILE


def output_paths(out: str, precisions: Sequence[str]) -> dict[str, str]:
  """`{precision: path}`: `out` itself for one precision, `STEM_PRECISION.tflite` for several."""
  if len(precisions) == 1:
    return {precisions[0]: out}
  stem = out[:-len('.tflite')] if out.endswith('.tflite') else out
  return {p: f'{stem}_{p}.tflite' for p in precisions}


def export_model(module: nn.Module, variables: Mapping[str, Any], image_size: int, out: str, *,
                 precisions: Sequence[str] = ('fp32',),
                 calibration: np.ndarray | None = None,
                 eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None,
                 labels: Sequence[str] = (), model_name: str = '', weights: str = '',
                 eval_source: str | None = None, batch: int = 1, input_type: str = 'uint8',
                 output: str = 'probabilities', allow_mismatch: bool = False,
                 activation_percentile: float | None = DEFAULT_ACTIVATION_PERCENTILE,
                 report: bool = True, runs: int = 30, log=print) -> dict[str, Any]:
  """Exports at each precision; with `report`, measures and writes `STEM.report.{json,md}`.

  Args:
    module, variables: the classifier and its variables (`params`, `batch_stats`).
    image_size: S, the served resolution.
    out: `FILE.tflite`; with several precisions `FILE_<precision>.tflite` each.
    precisions: any of 'fp32', 'fp16', 'int8'.
    calibration: `(N, S, S, 3)` uint8 real photos; needed for int8.
    eval_images, eval_labels: `(M, S, S, 3)` uint8 and `(M,)` int labels in the model's label
      order: the parity set (else `calibration`) and the report's accuracy.
    labels: class names, packed into the metadata.
    model_name, weights, eval_source: descriptions for the metadata and the report.
    batch, input_type, output, allow_mismatch, activation_percentile: see
      `kdflax.export.tflite.export_tflite`.
    report: measure latency / memory / accuracy and write the report files.
    runs: timed invocations per latency figure.
    log: progress lines.

  Returns:
    The report dict (`model`, `params`, `macs`, `jax_accuracy`, `exports`: one entry per file
    with `precision`, `file`, `size_mb`, `latency`, `accuracy`, `parity`, `parity_summary`);
    without `report`, `exports` holds only the file, precision and parity.

  Raises:
    ValueError, RuntimeError: conversion, interpreter or parity failure (one line).
  """
  from kdflax.export.report import accuracy, measure_tflite, write_report
  from kdflax.export.serving import jax_logits, serving_function
  from kdflax.export.tflite import export_tflite
  from kdflax.models.complexity import count_macs, count_params

  if 'int8' in precisions and calibration is None:
    raise ValueError('int8 export needs calibration photos')
  parity_images = eval_images if eval_images is not None else calibration
  results = []
  for precision, path in output_paths(out, precisions).items():
    result = export_tflite(
        module, variables, image_size, path, precision=precision,
        calibration_images=calibration, parity_images=parity_images, batch=batch,
        labels=tuple(labels), input_type=input_type, allow_mismatch=allow_mismatch,
        model_name=model_name, output=output, activation_percentile=activation_percentile)
    log(f'{result.path}: {result.size_mb:.2f} MB; {result.parity.summary()}')
    results.append(result)
  summary: dict[str, Any] = {
      'model': model_name, 'source': weights, 'image_size': image_size,
      'labels': list(labels), 'batch': batch,
      'input_desc': f'image ({batch}, {image_size}, {image_size}, 3) {input_type} RGB '
                    f'{"0..255" if input_type == "uint8" else "0..1"} -> {output} float32',
      'output': output, 'num_classes': results[0].num_classes,
      'params': count_params(variables), 'macs': count_macs(module, variables, image_size),
      'jax_accuracy': None, 'eval_source': eval_source,
      'eval_images': None if eval_images is None else int(len(eval_images)), 'exports': []}
  if not report:
    summary['exports'] = [{'file': os.path.basename(r.path), 'precision': r.precision,
                           'parity': r.parity.as_dict(), 'parity_summary': r.parity.summary()}
                          for r in results]
    return summary
  if eval_images is not None:
    fn = serving_function(module, variables, 'uint8')
    summary['jax_accuracy'] = accuracy(jax_logits(fn, eval_images), eval_labels)
  for result in results:
    print(f'measuring {os.path.basename(result.path)} ...', file=sys.stderr)
    stats = measure_tflite(result.path, eval_images, eval_labels, runs=runs)
    stats.update(precision=result.precision, ops=dict(result.ops),
                 parity=result.parity.as_dict(), parity_summary=result.parity.summary())
    summary['exports'].append(stats)
  stem = out[:-len('.tflite')] if out.endswith('.tflite') else out
  json_path, md_path = write_report(stem, summary)
  log(f'report: {json_path}, {md_path}')
  return summary
