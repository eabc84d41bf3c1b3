"""Read and annotate `.tflite` flatbuffers without running them.

Everything here parses the file with the TFLite schema only, so it is safe on graphs that would
abort the LiteRT interpreter (e.g. int8 erf-GELU): the op list of a freshly converted model can
be checked in the parent process, and only execution goes to a subprocess.

    ops = op_names(model_bytes)                # ['DEQUANTIZE', 'QUANTIZE', 'CONV_2D', ...]
    model_bytes = add_metadata(model_bytes, 'kdflax', json_bytes)
    read_metadata(model_bytes, 'kdflax')       # -> json_bytes
    model_bytes = dequantize_uint8_inputs(model_bytes)   # CAST -> DEQUANTIZE at the input
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils


@functools.cache
def _builtin_names() -> dict[int, str]:
  return {v: k for k, v in vars(schema.BuiltinOperator).items()
          if not k.startswith('_') and isinstance(v, int)}


def _model(model: bytes | bytearray) -> schema.Model:
  if len(model) < 8 or bytes(model[4:8]) != b'TFL3':
    raise ValueError('not a TFLite flatbuffer (missing the TFL3 identifier)')
  return schema.Model.GetRootAs(model, 0)


def op_codes(model: bytes | bytearray) -> list[str]:
  """Operator codes a model declares: builtins by name, custom ops as `CUSTOM:<code>`."""
  m = _model(model)
  names = _builtin_names()
  out = []
  for i in range(m.OperatorCodesLength()):
    code = m.OperatorCodes(i)
    builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
    if builtin == schema.BuiltinOperator.CUSTOM:
      custom = code.CustomCode()
      out.append('CUSTOM:' + (custom.decode() if custom else '?'))
    else:
      out.append(names.get(builtin, f'BUILTIN_{builtin}'))
  return out


def op_names(model: bytes | bytearray, subgraph: int = 0) -> list[str]:
  """Operator names of `subgraph` in execution order (one entry per node)."""
  m = _model(model)
  codes = op_codes(model)
  g = m.Subgraphs(subgraph)
  return [codes[g.Operators(i).OpcodeIndex()] for i in range(g.OperatorsLength())]


def op_histogram(model: bytes | bytearray) -> dict[str, int]:
  """`{op name: count}` over the main subgraph, most frequent first."""
  return dict(Counter(op_names(model)).most_common())


def non_builtin_ops(model: bytes | bytearray) -> list[str]:
  """Custom and Flex (TF select) ops, which a stock LiteRT runtime cannot run; [] when clean."""
  return sorted({c for c in op_codes(model) if c.startswith('CUSTOM:')})


def tensor_types(model: bytes | bytearray, subgraph: int = 0) -> dict[str, int]:
  """`{tensor type name: count}` of the subgraph's tensors (e.g. how many stay FLOAT32)."""
  m = _model(model)
  g = m.Subgraphs(subgraph)
  names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith('_')}
  return dict(Counter(names.get(g.Tensors(i).Type(), '?') for i in range(g.TensorsLength())))


def read_metadata(model: bytes | bytearray, name: str) -> bytes | None:
  """The bytes stored under metadata entry `name`, or None when the model has none."""
  m = _model(model)
  for i in range(m.MetadataLength()):
    entry = m.Metadata(i)
    if entry.Name() is not None and entry.Name().decode() == name:
      buf = m.Buffers(entry.Buffer())
      if buf.Offset():  # large models keep buffers after the flatbuffer
        return bytes(model[buf.Offset():buf.Offset() + buf.Size()])
      return buf.DataAsNumpy().tobytes() if buf.DataLength() else b''
  return None


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
