"""`kdflax predict`: classify image files with a `.tflite` model or a model directory.

    kdflax predict --model out/student_int8.tflite photos/ more/leaf.jpg --top_k 3
    {"file": "photos/a.jpg", "label": "bean_rust", "score": 0.91, "index": 1, "top_k": [...]}

One JSON line per image on stdout, in the order the files are found (folders are searched
recursively, sorted); a progress bar on stderr. An image that cannot be decoded gets a line
`{"file": ..., "error": ...}` (and a message on stderr) and is skipped. Scores are class
probabilities: the file's output when it outputs probabilities (kdflax's default, renormalised
to sum 1 where int8 rounding moved the sum), else the softmax of its logits. Exit status:
0 all images classified, 1 some failed, 2 bad usage (no such model or path, no images) or a
bad model (an empty, foreign or truncated `.tflite`, one line on stderr;
`kdflax.export.flatbuffer.read_tflite`).

Each image is brought to the model's input as the training pipeline evaluates it (the
evaluation view, `kdflax.data.eval_view.eval_view`: the centre box sampled as MediaPipe samples a
region of interest; `kdflax.export.images.load_image`), then fed as uint8. Labels: kdflax's
metadata, else the standard TFLite metadata's label file (any image classifier prepared for
MediaPipe), else `FILE.labels.txt`, else the class index.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 64  # images decoded ahead (in threads) and classified per step


def _parser(prog: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0])
  p.add_argument('--model', required=True, help='FILE.tflite or a model directory')
  p.add_argument('paths', nargs='+', metavar='PATH', help='image files or folders')
  p.add_argument('--top_k', type=int, default=3, help='classes listed per image')
  p.add_argument('--threads', type=int, default=max(1, min(4, os.cpu_count() or 1)),
                 help='interpreter threads (and image decoding threads)')
  p.add_argument('--no-progress', '--no_progress', dest='progress', action='store_false',
                 help='no progress bar on stderr')
  return p


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _looks_like_probabilities(scores: np.ndarray) -> bool:
  """Rows in [0, 1] summing to 1 (within int8 output rounding): a file of unstated output."""
  if not len(scores):
    return False
  sums = scores.sum(-1)
  return bool(scores.min() >= 0 and scores.max() <= 1 and np.all(np.abs(sums - 1) < 0.05))


def probabilities(scores: np.ndarray, kind: str | None) -> np.ndarray:
  """`(N, K)` model outputs of `kind` ('probabilities', 'logits', None: unknown) -> rows
  that sum to 1 (probabilities renormalised, logits through a softmax)."""
  scores = np.asarray(scores, np.float64)
  if kind == 'probabilities' or (kind is None and _looks_like_probabilities(scores)):
    p = np.clip(scores, 0, None)
    sums = p.sum(-1, keepdims=True)
    return np.where(sums > 0, p / np.where(sums > 0, sums, 1), 1.0 / scores.shape[-1])
  return _softmax(scores)


class _Classifier:
  """`(N, S, S, 3)` uint8 -> `(N, K)` outputs of `kind`, from a `.tflite` or a model dir."""

  def __init__(self, model: str, threads: int):
    if os.path.isfile(model):
      clf = _tflite_classifier(model, threads)
      self.image_size, self.labels, self.run = clf.image_size, clf.labels, clf
      self.kind = clf.output_kind
    elif os.path.isdir(model):
      self.image_size, self.labels, self.run = _jax_classifier(model)
      self.kind = 'logits'
    else:
      raise FileNotFoundError(f'--model {model}: no such file or directory')


def _one_line(text: str) -> str:
  return '; '.join(line.strip() for line in str(text).splitlines() if line.strip())


def _tflite_classifier(path: str, threads: int):
  """A `TFLiteClassifier` for `path`, after checking the file (`flatbuffer.read_tflite`).

  Raises:
    ModelFileError: empty, foreign or truncated file, or one the interpreter refuses (one line
      naming `path`).
  """
  from kdflax.export.flatbuffer import ModelFileError, read_tflite
  from kdflax.export.interpreter import TFLiteClassifier
  read_tflite(path)
  try:
    return TFLiteClassifier(path, num_threads=threads)
  except ModelFileError:
    raise
  except (ValueError, RuntimeError) as e:
    message = _one_line(e)
    if not message.startswith(path):
      message = f'{path}: the LiteRT interpreter cannot load it: {message}'
    raise ModelFileError(message) from None


def _jax_classifier(directory: str) -> tuple[int, tuple[str, ...], Callable]:
  import jax
  import jax.numpy as jnp

  from kdflax.train.checkpoint import load_model
  info, variables = load_model(directory)
  module, size = info.create()
  apply = jax.jit(lambda v, x: module.apply(v, x.astype(jnp.float32) / 255.0, train=False))

  def run(images: np.ndarray) -> np.ndarray:
    n = len(images)
    padded = np.concatenate([images, np.repeat(images[-1:], CHUNK - n, axis=0)]) \
        if n < CHUNK else images  # one compiled shape
    return np.asarray(apply(variables, padded))[:n]

  return size, info.labels, run


def _label(labels: Sequence[str], i: int) -> str:
  return labels[i] if i < len(labels) else str(i)


def main(argv: list[str]) -> int:
  """`argv[0]` is the command name. Returns 0 all ok, 1 some images failed, 2 bad usage."""
  parser = _parser(f'kdflax {argv[0] if argv else "predict"}')
  try:
    args = parser.parse_args(argv[1:])
    if args.top_k < 1:
      parser.error('--top_k must be >= 1')
    if args.threads < 1:
      parser.error('--threads must be >= 1')
  except SystemExit as e:
    return int(e.code or 0)

  from kdflax.export.images import ImageError, find_images, load_image
  try:
    files = find_images(args.paths)
    if not files:
      raise FileNotFoundError(f'no images under {" ".join(args.paths)}')
    clf = _Classifier(args.model, args.threads)
  except (FileNotFoundError, ValueError) as e:
    print(f'kdflax predict: error: {_one_line(e)}', file=sys.stderr)
    return 2

  from tqdm import tqdm
  size, labels = clf.image_size, clf.labels
  k = args.top_k
  failed = 0

  def load(path: str):
    try:
      return load_image(path, size)
    except ImageError as e:
      return e

  bar = tqdm(total=len(files), unit='img', file=sys.stderr, disable=not args.progress,
             mininterval=0.5)
  with ThreadPoolExecutor(max_workers=args.threads) as pool:
    for start in range(0, len(files), CHUNK):
      chunk = files[start:start + CHUNK]
      loaded = list(pool.map(load, chunk))
      good = [i for i, x in enumerate(loaded) if not isinstance(x, ImageError)]
      probs = probabilities(clf.run(np.stack([loaded[i] for i in good])), clf.kind) \
          if good else None
      row = {i: r for r, i in enumerate(good)}
      lines = []
      for i, path in enumerate(chunk):
        if i not in row:
          failed += 1
          bar.write(f'kdflax predict: skipping {loaded[i]}', file=sys.stderr)
          lines.append({'file': path, 'error': str(loaded[i])})
          continue
        p = probs[row[i]]
        top = np.argsort(-p, kind='stable')[:min(k, len(p))]
        lines.append({'file': path, 'label': _label(labels, int(top[0])),
                      'score': round(float(p[top[0]]), 6), 'index': int(top[0]),
                      'top_k': [{'label': _label(labels, int(j)), 'score': round(float(p[j]), 6)}
                                for j in top]})
      sys.stdout.write(''.join(json.dumps(line) + '\n' for line in lines))
      sys.stdout.flush()
      bar.update(len(chunk))
  bar.close()
  if failed:
    print(f'kdflax predict: {failed} of {len(files)} images could not be read', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main(['predict', *sys.argv[1:]]))
