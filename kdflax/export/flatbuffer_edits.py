"""Copies of a `.tflite` with one change, made through the TFLite schema's object API.

    model_bytes = add_metadata(model_bytes, 'kdflax', json_bytes)
    model_bytes = dequantize_uint8_inputs(model_bytes)   # CAST -> DEQUANTIZE at the input
    model_bytes = append_softmax(model_bytes)            # float SOFTMAX on the float output

An edit that changes the model re-serialises the flatbuffer, which drops anything appended
after it (the packed files of the standard metadata): edit first, then write the standard
metadata (`model_metadata.py`).
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils


def add_metadata(model: bytes | bytearray, name: str, data: bytes) -> bytes:
  """A copy of `model` with metadata entry `name` set to `data` (replaced if present).

  Metadata entries are ignored by the interpreter; they travel with the file, so an app (or
  `kdflax predict`) can read the labels and the input format from the model itself.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  for buf in obj.buffers:
    if buf.offset:
      raise ValueError('models with offset buffers (> 2 GB) cannot be annotated')
  obj.metadata = [e for e in (obj.metadata or []) if e.name not in (name, name.encode())]
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(bytes(data), dtype=np.uint8)
  obj.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name = name
  entry.buffer = len(obj.buffers) - 1
  obj.metadata.append(entry)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def dequantize_uint8_inputs(model: bytes | bytearray) -> bytes:
  """A copy of `model` whose uint8 -> float32 CASTs of graph inputs are DEQUANTIZE ops.

  jax2tf turns `image.astype(float32)` into CAST, which XNNPACK does not take: LiteRT runs it
  with its scalar builtin kernel, 1.5-3% of MobileNetV3-Large's fp32 latency at 224 px (one
  thread; `docs/benchmarks.md`). The input tensor is given the identity quantization
  (scale 1, zero point 0), under which DEQUANTIZE computes exactly `float(q)` and XNNPACK runs
  it as a vectorised convert. The app still feeds raw uint8 pixels; the values are unchanged.
  Other CASTs are left alone; a model with none is returned unchanged.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  codes = obj.operatorCodes
  changed = False
  for graph in obj.subgraphs:
    inputs = {int(i) for i in graph.inputs}
    for op in graph.operators:
      if flatbuffer_utils.get_builtin_code_from_operator_code(
          codes[op.opcodeIndex]) != schema.BuiltinOperator.CAST:
        continue
      src, dst = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
      if (int(op.inputs[0]) not in inputs or src.type != schema.TensorType.UINT8
          or dst.type != schema.TensorType.FLOAT32
          or (src.quantization is not None and src.quantization.scale is not None
              and len(src.quantization.scale))):
        continue
      op.opcodeIndex = _opcode_index(codes, schema.BuiltinOperator.DEQUANTIZE)
      op.builtinOptionsType = schema.BuiltinOptions.NONE
      op.builtinOptions = None
      quant = schema.QuantizationParametersT()
      quant.scale = np.ones(1, np.float32)
      quant.zeroPoint = np.zeros(1, np.int64)
      src.quantization = quant
      changed = True
  if not changed:
    return bytes(model)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def append_softmax(model: bytes | bytearray) -> bytes:
  """A copy of `model` whose single float32 `(B, K)` output goes through a float SOFTMAX.

  For full-int8 classifiers: the converter would quantize a softmax in the graph (int8
  SOFTMAX, output steps of 1/256, so close classes tie, and XNNPACK does not take it: a
  second delegate partition). Appended after the final DEQUANTIZE it runs in float, on
  XNNPACK, in the same partition. The signature's output keeps its name and now names the
  new tensor.

  Raises:
    ValueError: the model does not have exactly one float32 output.
  """
  obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
  graph = obj.subgraphs[0]
  if len(graph.outputs) != 1:
    raise ValueError(f'append_softmax: expected one output, found {len(graph.outputs)}')
  src = int(graph.outputs[0])
  logits = graph.tensors[src]
  if logits.type != schema.TensorType.FLOAT32:
    raise ValueError('append_softmax: the output is not float32')
  buffer = schema.BufferT()
  obj.buffers.append(buffer)
  out = schema.TensorT()
  out.shape = np.array(logits.shape, np.int32)
  if logits.shapeSignature is not None:
    out.shapeSignature = np.array(logits.shapeSignature, np.int32)
  out.type = schema.TensorType.FLOAT32
  out.buffer = len(obj.buffers) - 1
  out.name = 'softmax_output'
  graph.tensors.append(out)
  dst = len(graph.tensors) - 1
  op = schema.OperatorT()
  op.opcodeIndex = _opcode_index(obj.operatorCodes, schema.BuiltinOperator.SOFTMAX)
  op.inputs = np.array([src], np.int32)
  op.outputs = np.array([dst], np.int32)
  op.builtinOptionsType = schema.BuiltinOptions.SoftmaxOptions
  op.builtinOptions = schema.SoftmaxOptionsT()
  op.builtinOptions.beta = 1.0
  graph.operators.append(op)
  graph.outputs = np.array([dst], np.int32)
  for signature in obj.signatureDefs or []:
    for entry in signature.outputs or []:
      if entry.tensorIndex == src:
        entry.tensorIndex = dst
  return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def _opcode_index(codes: list, builtin: int) -> int:
  """Index of `builtin` in the model's operator codes, appended (version 1) if absent."""
  for i, code in enumerate(codes):
    if flatbuffer_utils.get_builtin_code_from_operator_code(code) == builtin:
      return i
  code = schema.OperatorCodeT()
  code.builtinCode = builtin
  code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
  code.version = 1
  codes.append(code)
  return len(codes) - 1
