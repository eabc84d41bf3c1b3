"""The report written beside an exported model: size, speed, memory, accuracy per precision.

    stats = measure_tflite('student_int8.tflite', images, labels)   # in child processes
    report = {'model': ..., 'exports': [stats, ...], ...}
    write_report('out/student', report)     # out/student.report.json + out/student.report.md

Latency is the wall time of one `invoke()` of the batch-1 model (median and 90th percentile
after warm-up), for 1 and 4 interpreter threads, measured in a fresh child process per model
and thread count; the child's CPU time per invoke is recorded too (with 1 thread it is the
latency minus the time the OS spent on other processes). Peak memory is the child's resident
set high-water mark (Python + NumPy + LiteRT + the model), with its resident size before
loading the model alongside for reference.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdflax import atomic
from kdflax.export.isolated import benchmark_isolated, run_isolated


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of `(N, K)` logits against `(N,)` integer labels."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if len(logits) != len(labels) or not len(labels):
    raise ValueError(f'accuracy: {len(logits)} predictions for {len(labels)} labels')
  return float(np.mean(logits.argmax(-1) == labels))


def measure_tflite(path: str | os.PathLike, images: np.ndarray | None = None,
                   labels: np.ndarray | None = None, threads: Sequence[int] = (1, 4),
                   warmup: int = 5, runs: int = 30) -> dict[str, Any]:
  """Latency, memory and (given `images` and `labels`) accuracy of one `.tflite`.

  Args:
    path: the model.
    images: `(N, S, S, 3)` uint8 labelled images, or None.
    labels: `(N,)` int class indices of `images` in the model's label order.
    threads: interpreter thread counts to time.
    warmup, runs: untimed and timed invocations per thread count.

  Returns:
    `{'file', 'size_mb', 'latency': {'threads_1': {'median_ms', 'p90_ms', 'cpu_median_ms'},
    ...}, 'peak_rss_mb', 'rss_before_mb', 'accuracy' (or None)}`.
  """
  path = os.fspath(path)
  out: dict[str, Any] = {'file': os.path.basename(path),
                         'size_mb': os.path.getsize(path) / 1e6, 'latency': {}}
  peaks, befores = [], []
  for t in threads:
    (stats,) = benchmark_isolated([path], threads=t, warmup=warmup, runs=runs)
    out['latency'][f'threads_{t}'] = {
        'median_ms': stats['median_ms'], 'p90_ms': stats['p90_ms'],
        'cpu_median_ms': stats['cpu_median_ms'], 'batch': stats['batch']}
    peaks.append(stats['peak_rss_mb'])
    befores.append(stats['rss_before_mb'])
  out['peak_rss_mb'] = max(peaks) if peaks else None
  out['rss_before_mb'] = min(befores) if befores else None
  out['accuracy'] = None
  if images is not None and labels is not None and len(images):
    out['accuracy'] = accuracy(run_isolated(path, images), labels)
    out['accuracy_images'] = int(len(images))
  return out


def machine_info() -> dict[str, Any]:
  """Where the numbers were measured."""
  info: dict[str, Any] = {'platform': platform.platform(), 'processor': platform.machine(),
                          'cpu_count': os.cpu_count(), 'python': platform.python_version()}
  try:
    from importlib.metadata import version
    info['ai_edge_litert'] = version('ai-edge-litert')
    info['tensorflow'] = version('tensorflow-cpu')
  except Exception:  # noqa: BLE001 - metadata is best effort
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return info


def _fmt(x: Any, spec: str) -> str:
  return '-' if x is None else format(x, spec)


def render_markdown(report: Mapping[str, Any]) -> str:
  """Human-readable version of a report dict (see `kdflax.commands.export`)."""
  lines = [f"# Export report: {report.get('model', '?')}", '']
  lines.append(f"- input: `{report.get('input_desc', '')}`")
  lines.append(f"- classes: {report.get('num_classes')}"
               + (f" ({', '.join(report['labels'])})" if report.get('labels') else ''))
  if report.get('params') is not None:
    lines.append(f"- parameters: {report['params']:,}; MACs per image: "
                 f"{report['macs'] / 1e6:.1f} M")
  if report.get('source'):
    lines.append(f"- weights: {report['source']}")
  if report.get('jax_accuracy') is not None:
    lines.append(f"- JAX (float32) accuracy on {report.get('eval_images')} images of "
                 f"`{report.get('eval_source')}`: {report['jax_accuracy']:.2%}")
  lines += ['', '| precision | file | MB | latency 1 thr median / p90 ms | 4 thr median / p90 ms '
            '| peak RSS MB | accuracy | parity |',
            '|---|---|---|---|---|---|---|---|']
  for e in report.get('exports', []):
    lat = e.get('latency', {})
    one, four = lat.get('threads_1', {}), lat.get('threads_4', {})
    acc = e.get('accuracy')
    lines.append(
        f"| {e['precision']} | `{e['file']}` | {e['size_mb']:.2f} "
        f"| {_fmt(one.get('median_ms'), '.2f')} / {_fmt(one.get('p90_ms'), '.2f')} "
        f"| {_fmt(four.get('median_ms'), '.2f')} / {_fmt(four.get('p90_ms'), '.2f')} "
        f"| {_fmt(e.get('peak_rss_mb'), '.0f')} | {'-' if acc is None else f'{acc:.2%}'} "
        f"| {e.get('parity_summary', '')} |")
  lines += ['', 'Latency: wall time of one batch-1 `invoke()` in a fresh LiteRT process '
            '(XNNPACK), after warm-up. Peak RSS: that process\'s high-water mark '
            '(Python + LiteRT + model).']
  machine = report.get('machine', {})
  if machine:
    lines.append(f"Measured on {machine.get('cpu', machine.get('processor', '?'))}, "
                 f"{machine.get('cpu_count')} CPUs, ai-edge-litert "
                 f"{machine.get('ai_edge_litert', '?')}, {report.get('created', '')}.")
  return '\n'.join(lines) + '\n'


def report_paths(stem: str | os.PathLike) -> tuple[str, str]:
  """`stem` -> (`stem.report.json`, `stem.report.md`)."""
  stem = os.fspath(stem)
  return stem + '.report.json', stem + '.report.md'


def write_report(stem: str | os.PathLike, report: Mapping[str, Any]) -> tuple[str, str]:
  """Writes the JSON and Markdown reports atomically; returns their paths."""
  report = dict(report)
  report.setdefault('created', datetime.datetime.now().isoformat(timespec='seconds'))
  report.setdefault('machine', machine_info())
  json_path, md_path = report_paths(stem)
  atomic.write_json(json_path, report)
  atomic.write_text(md_path, render_markdown(report))
  return json_path, md_path
