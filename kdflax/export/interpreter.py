"""Run an exported `.tflite` classifier with the LiteRT interpreter.

    clf = TFLiteClassifier('student.tflite', num_threads=4)
    scores = clf(images)          # images (N, S, S, 3) uint8 RGB -> (N, K) float32 outputs
    clf.output_kind               # 'probabilities', 'logits' or None (not stated by the file)
    clf.labels                    # class names stored in the file (or in FILE.labels.txt)

Labels come from kdflax's own metadata entry, else the standard TFLite Model Metadata's
TENSOR_AXIS_LABELS file packed in the model (`model_metadata.py`: any image classifier
with standard metadata, e.g. one prepared for MediaPipe), else `FILE.labels.txt`.

Imports only NumPy and `ai_edge_litert`, so the subprocess workers in `isolated.py` start fast
and their memory high-water mark is the interpreter's, not TensorFlow's or JAX's.
"""

from __future__ import annotations

import json
import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from kdflax.export.flatbuffer import read_metadata
from kdflax.export.model_metadata import StandardMetadata, read_standard_metadata

METADATA_NAME = 'kdflax'
SIGNATURE_KEY = 'serving_default'
INPUT_NAME = 'image'
OUTPUT_NAME = 'probabilities'   # 'logits' for files exported with output='logits'


def labels_path(model_path: str | os.PathLike) -> str:
  """`dir/name.tflite` -> `dir/name.labels.txt`, the sidecar holding one class name per line."""
  base = os.fspath(model_path)
  if base.endswith('.tflite'):
    base = base[:-len('.tflite')]
  return base + '.labels.txt'


def read_model_metadata(content: bytes) -> dict:
  """The JSON kdflax stores in a `.tflite` (`{}` for files written by other tools)."""
  raw = read_metadata(content, METADATA_NAME)
  if not raw:
    return {}
  try:
    return json.loads(raw.decode())
  except (UnicodeDecodeError, json.JSONDecodeError):
    return {}


class TFLiteClassifier:
  """An image classifier `.tflite` with one image input and one scores output.

  Attributes:
    path: the model file.
    metadata: what kdflax stored in the file (`{}` for foreign models and old files).
    standard: the standard TFLite Model Metadata (None when the file has none).
    labels: class names, from kdflax's metadata, else the standard metadata's label file,
      else the `.labels.txt` sidecar, else `()`.
    output_kind: 'probabilities' or 'logits' as the file states it (kdflax metadata; files
      from before the probabilities output are 'logits'), None when unknown.
    batch, image_size: the static input shape `(batch, image_size, image_size, 3)`.
  """

  def __init__(self, path: str | os.PathLike, num_threads: int = 1):
    self.path = os.fspath(path)
    try:
      with open(self.path, 'rb') as f:
        content = f.read()
    except OSError as e:
      raise ValueError(f'{self.path}: cannot read model ({e.strerror})') from None
    if len(content) < 8 or content[4:8] != b'TFL3':
      raise ValueError(f'{self.path}: not a TFLite model (no TFL3 identifier)')
    self.metadata = read_model_metadata(content)
    self.standard: StandardMetadata | None = read_standard_metadata(content, self.path)
    self.interpreter = Interpreter(model_content=content, num_threads=int(num_threads))
    self.interpreter.allocate_tensors()
    inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
      raise ValueError(f'{self.path}: expected one input and one output, found '
                       f'{len(inputs)} and {len(outputs)}')
    self._input, self._output = inputs[0], outputs[0]
    shape = tuple(int(d) for d in self._input['shape'])
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
      raise ValueError(f'{self.path}: expected a (B, S, S, 3) image input, found {shape}')
    self.batch, self.image_size = shape[0], shape[1]
    self.labels = (tuple(self.metadata.get('labels', ()))
                   or (self.standard.labels if self.standard else ()) or self._sidecar_labels())
    self.output_kind = self._output_kind()

  def _output_kind(self) -> str | None:
    if self.metadata:
      return self.metadata.get('output', {}).get('kind', 'logits')  # older kdflax: logits
    if self.standard:
      text = f'{self.standard.output_name} {self.standard.output_description}'.lower()
      if 'logit' in text:
        return 'logits'
      if 'probabilit' in text:
        return 'probabilities'
    return None

  def _sidecar_labels(self) -> tuple[str, ...]:
    path = labels_path(self.path)
    if not os.path.isfile(path):
      return ()
    with open(path, encoding='utf-8') as f:
      return tuple(line.rstrip('\n') for line in f if line.strip())

  @property
  def delegate_partitions(self) -> int:
    """Subgraphs handed to a delegate (XNNPACK on CPU): 1 means the whole model runs there."""
    return sum(op['op_name'] == 'DELEGATE' for op in self.interpreter._get_ops_details())

  @property
  def input_dtype(self) -> np.dtype:
    return np.dtype(self._input['dtype'])

  def prepare(self, images: np.ndarray) -> np.ndarray:
    """uint8 RGB `(B, S, S, 3)` -> the input tensor this model takes.

    kdflax models take uint8 as is (unquantized or with the identity quantization scale 1,
    zero point 0; float32 models exported with `input_type='float32'` take 0..1). Files
    with standard metadata follow its convention (as MediaPipe does): a uint8 input takes
    the pixels as they are, a float input `(pixel - mean) / std` of its
    NormalizationOptions. Another quantized input is quantized from 0..1; other float
    models get 0..255 floats.
    """
    images = np.asarray(images)
    scale, zero = self._input['quantization']
    dtype = self.input_dtype
    if dtype == np.uint8 and (not scale or (scale == 1.0 and zero == 0)
                              or (self.standard and not self.metadata)):
      return images.astype(np.uint8)  # raw pixels (kdflax: identity-quantized input)
    if self.standard and not self.metadata and self.standard.input_std \
        and np.issubdtype(dtype, np.floating):
      mean = np.asarray(self.standard.input_mean, np.float32)
      std = np.asarray(self.standard.input_std, np.float32)
      return ((images.astype(np.float32) - mean) / std).astype(dtype)
    if scale:
      x = images.astype(np.float32) * self.metadata.get('input_scale', 1 / 255)
      info = np.iinfo(dtype)
      return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
    return (images.astype(np.float32) * self.metadata.get('input_scale', 1.0)).astype(dtype)

  def set_input(self, images: np.ndarray) -> None:
    """Loads one batch of uint8 images `(batch, S, S, 3)` into the input tensor."""
    self.interpreter.set_tensor(self._input['index'], self.prepare(images))

  def invoke(self) -> np.ndarray:
    """Runs the loaded batch; `(batch, K)` float32 outputs (dequantized if needed)."""
    self.interpreter.invoke()
    out = self.interpreter.get_tensor(self._output['index'])
    scale, zero = self._output['quantization']
    if scale:
      return (out.astype(np.float32) - zero) * scale
    return out.astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """`(N, S, S, 3)` uint8 -> `(N, K)` float32 outputs (`output_kind`), in chunks of the
    model's batch."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'{self.path}: expected images of shape (N, {self.image_size}, '
                       f'{self.image_size}, 3), got {images.shape}')
    results = []
    for start in range(0, len(images), self.batch):
      chunk = images[start:start + self.batch]
      n = len(chunk)
      if n < self.batch:  # pad the last chunk; padding rows are dropped below
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
      self.set_input(chunk)
      results.append(self.invoke()[:n])
    if not results:
      return np.zeros((0, int(self._output['shape'][-1])), np.float32)
    return np.concatenate(results)
