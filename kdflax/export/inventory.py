"""What a `.tflite` contains: its operators and tensor types, read without running it.

Everything here parses the file with the TFLite schema only, so it is safe on graphs that would
abort the LiteRT interpreter (e.g. int8 erf-GELU): the op list of a freshly converted model can
be checked in the parent process, and only execution goes to a subprocess.

    op_names(model_bytes)          # ['DEQUANTIZE', 'QUANTIZE', 'CONV_2D', ...]
    non_builtin_ops(model_bytes)   # [] unless a Flex / custom op slipped in
"""

from __future__ import annotations

import functools
from collections import Counter

from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

from kdflax.export.flatbuffer import validate_tflite


@functools.cache
def _builtin_names() -> dict[int, str]:
  return {v: k for k, v in vars(schema.BuiltinOperator).items()
          if not k.startswith('_') and isinstance(v, int)}


def _model(model: bytes | bytearray) -> schema.Model:
  validate_tflite(model)
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
