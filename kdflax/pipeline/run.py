"""The whole run: teacher -> baseline student -> distilled student -> export -> results.

    rows = run_pipeline(config, 'runs/quickstart')   # also runs/quickstart/results.{md,json}

Stages run in `WORKDIR/{teacher,student,distill}` (each resumes from its own checkpoints; a
stage finished with the same config is not rebuilt). With `config.teacher.checkpoint` the
teacher stage is skipped and the given teacher is scored; with `config.teacher.cache` (and no
checkpoint) it is skipped too and the distilled student trains from the cache's teacher
outputs (the teacher's row shows the score the cache recorded). The distilled student's best model
is exported to `WORKDIR/export/` at each of `config.export.precisions`, calibrated on the
train split and scored on the eval split of the configured source (image folders or TFDS);
with `config.export.qat.epochs > 0` its int8 file comes from a quantisation-aware fine-tune
in `WORKDIR/qat` (`kdflax.pipeline.qat`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

from kdflax import atomic

NOTE = ('Val top-1 of the trained stages is measured by the tf.data eval pipeline; the exported '
        'rows run the .tflite on the same photos through `kdflax.data.eval_view` (the one '
        'evaluation view: the same uint8 pixels, as an app using MediaPipe with the documented '
        'region of interest feeds them). Parity (same images through JAX and the .tflite) is in '
        'the last column.')


def _row(name: str, summary: Mapping[str, Any]) -> dict[str, Any]:
  best = summary.get('best', {})
  return {'stage': name, 'model': summary.get('model', ''), 'params': summary.get('params'),
          'gmacs': summary.get('gmacs'), 'top1': best.get('top1'), 'top5': best.get('top5'),
          'detail': summary.get('detail', '')}


def format_results(rows: list[dict[str, Any]]) -> str:
  """A Markdown table of the pipeline's results."""
  lines = ['| stage | model | params | GMACs | val top-1 | val top-5 | |',
           '|---|---|---:|---:|---:|---:|---|']
  for r in rows:
    params = f'{r["params"]:,}' if r.get('params') else '-'
    gmacs = f'{r["gmacs"]:.3f}' if r.get('gmacs') is not None else '-'
    top1 = f'{100 * r["top1"]:.1f}%' if r.get('top1') is not None else '-'
    top5 = f'{100 * r["top5"]:.1f}%' if r.get('top5') is not None else '-'
    lines.append(f'| {r["stage"]} | {r["model"]} | {params} | {gmacs} | {top1} | {top5} | '
                 f'{r.get("detail", "")} |')
  return '\n'.join(lines)


def export_stage(config, model_dir: str, out_dir: str, log=print,
                 precisions: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
  """Exports `model_dir` at each of `precisions` (default `config.export.precisions`).

  Calibration photos come from the train split and the parity/accuracy photos from the eval
  split of the configured source (image folders or TFDS). Returns one results row per
  exported file (accuracy of the `.tflite` on the eval photos, file size, 1-thread latency).
  """
  from kdflax.data.photos import describe_source, split_photos, to_model_labels
  from kdflax.data.pipeline import source_from_config
  from kdflax.export.export_model import export_model
  from kdflax.train.checkpoint import load_model

  info, variables = load_model(model_dir)
  module, size = info.create()
  data = config.data
  source = source_from_config(data)  # one source for both splits: TFDS is read once
  calib, _, _ = split_photos(source, data.train_split, size, config.export.calibration_images)
  eval_images = eval_labels = where = None
  if data.eval_split:
    eval_images, idx, classes = split_photos(source, data.eval_split, size,
                                             config.export.eval_images)
    where = f'{describe_source(source)} {data.eval_split}'
    eval_labels = to_model_labels(idx, classes, info.labels, where)
  os.makedirs(out_dir, exist_ok=True)
  log(f'[export] {info.model} -> {out_dir} at {", ".join(config.export.precisions)}')
  precisions = tuple(config.export.precisions if precisions is None else precisions)
  # Always MODEL_PRECISION.tflite, also for a single precision.
  stem = info.model if len(precisions) > 1 else f'{info.model}_{precisions[0]}'
  report = export_model(
      module, variables, size, os.path.join(out_dir, f'{stem}.tflite'), precisions=precisions,
      calibration=calib,
      eval_images=eval_images, eval_labels=eval_labels, labels=info.labels,
      model_name=info.model, weights=f'model directory {model_dir}', eval_source=where,
      # A parity shortfall is reported in the table instead of failing the whole run.
      allow_mismatch=True, activation_percentile=_percentile(config), runs=20, log=log)
  rows = []
  for item in report['exports']:
    latency = item['latency'].get('threads_1', {}).get('median_ms', float('nan'))
    rows.append({'stage': f'exported .tflite ({item["precision"]})', 'model': item['file'],
                 'params': report.get('params'), 'gmacs': report.get('macs', 0) / 1e9,
                 'top1': item.get('accuracy'), 'top5': None,
                 'detail': f'{item["size_mb"]:.2f} MB, {latency:.2f} ms/image (1 thread); '
                           f'{item["parity_summary"]}'})
  return rows


def _percentile(config) -> float | None:
  """`config.export.activation_percentile`; 100 means the converter's own min/max (None)."""
  value = float(config.export.activation_percentile)
  return None if value >= 100.0 else value


def export_student(config, model_dir: str, workdir: str, stage: str, teacher_dir: str | None,
                   log=print) -> list[dict[str, Any]]:
  """Exports the student at `model_dir` to `WORKDIR/export/`; its results rows.

  With `config.export.qat.epochs > 0` the int8 file comes from the student fine-tuned through
  simulated int8 in `WORKDIR/qat` (`kdflax.pipeline.qat`, same `stage` and teacher), which
  gets a row of its own; the float precisions come from `model_dir` itself.
  """
  from kdflax.pipeline.qat import qat_stage

  out_dir = os.path.join(workdir, 'export')
  precisions = tuple(config.export.precisions)
  if not int(config.export.qat.epochs) or 'int8' not in precisions:
    return export_stage(config, model_dir, out_dir, log)
  rows = []
  floats = tuple(p for p in precisions if p != 'int8')
  if floats:
    rows += export_stage(config, model_dir, out_dir, log, precisions=floats)
  summary = qat_stage(config, model_dir, os.path.join(workdir, 'qat'), stage,
                      teacher_dir=teacher_dir, log_fn=log)
  epochs = int(config.export.qat.epochs)
  rows.append(_row(f'{"distilled" if stage == "distill" else "baseline"} student, int8-aware '
                   f'fine-tune ({epochs} epoch{"s" * (epochs != 1)}, simulated int8)', summary))
  return rows + export_stage(config, summary['model_dir'], out_dir, log, precisions=('int8',))


def given_teacher_row(config, teacher_dir: str) -> dict[str, Any]:
  """The results row of a teacher the pipeline did not train: its top-1 on the eval split."""
  from kdflax.models import complexity
  from kdflax.train.checkpoint import read_model_info
  from kdflax.train.evaluation import evaluate_model_dir

  info = read_model_info(teacher_dir)
  cost = complexity.model_complexity(info.create()[0], info.image_size)
  top1 = top5 = None
  if config.data.eval_split:
    metrics = evaluate_model_dir(teacher_dir, config)
    top1, top5 = metrics['top1'], metrics['top5']
  return {'stage': 'teacher (given)', 'model': info.model, 'params': cost['params'],
          'gmacs': cost['gmacs'], 'top1': top1, 'top5': top5,
          'detail': f'{info.image_size}px, {teacher_dir}'}


def cached_teacher_row(config) -> dict[str, Any]:
  """The results row of the teacher behind `config.teacher.cache` (no teacher stage runs):
  its model and cost as the cache recorded them, its top-1 as measured when it was built."""
  from kdflax.models import complexity
  from kdflax.train.checkpoint import ModelInfo
  from kdflax.train.teacher_cache import TeacherCache

  cache = TeacherCache(config.teacher.cache)
  recorded = cache.fingerprint['teacher']
  size = int(cache.fingerprint['teacher_image_size'])
  info = ModelInfo(recorded['model'], int(recorded['num_classes']), size,
                   overrides=dict(recorded.get('overrides', {})))
  cost = complexity.model_complexity(info.create()[0], size)
  score = cache.manifest.get('teacher_eval') or {}
  return {'stage': 'teacher (cached outputs)', 'model': info.model, 'params': cost['params'],
          'gmacs': cost['gmacs'], 'top1': score.get('top1'), 'top5': score.get('top5'),
          'detail': f'{size}px; {cache.num_views} views per train image from '
                    f'{os.path.relpath(cache.directory)}'}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, log=print
                 ) -> list[dict[str, Any]]:
  """Runs every stage (see the module docstring); returns the results rows."""
  from kdflax.train.stages import run_stage
  start = time.perf_counter()
  rows = []
  teacher_dir = config.teacher.checkpoint
  if not teacher_dir and config.teacher.cache:
    log(f'[teacher] outputs from the teacher cache {config.teacher.cache} (config.teacher.cache)')
    rows.append(cached_teacher_row(config))
  elif not teacher_dir:
    summary = run_stage(config, os.path.join(workdir, 'teacher'), 'teacher', log_fn=log)
    rows.append(_row('teacher', summary))
    teacher_dir = summary['model_dir']
  else:
    log(f'[teacher] using {teacher_dir} (config.teacher.checkpoint)')
    rows.append(given_teacher_row(config, teacher_dir))
  summary = run_stage(config, os.path.join(workdir, 'student'), 'student', log_fn=log)
  rows.append(_row('baseline student', summary))
  summary = run_stage(config, os.path.join(workdir, 'distill'), 'distill',
                      teacher_dir=teacher_dir, log_fn=log)
  rows.append(_row('distilled student', summary))
  if config.export.enabled and config.export.precisions:
    rows.extend(export_student(config, summary['model_dir'], workdir, 'distill', teacher_dir,
                               log))
  table = format_results(rows)
  minutes = (time.perf_counter() - start) / 60
  atomic.write_text(os.path.join(workdir, 'results.md'),
                    f'# kdflax pipeline results\n\n{table}\n\n{NOTE}\n\n'
                    f'wall time {minutes:.1f} min\n')
  atomic.write_json(os.path.join(workdir, 'results.json'),
                    {'rows': rows, 'wall_minutes': round(minutes, 2)})
  log(f'\n{table}\n\npipeline finished in {minutes:.1f} min; results in '
      f'{os.path.join(workdir, "results.md")}')
  return rows
