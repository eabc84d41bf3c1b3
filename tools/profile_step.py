"""Where the time of one training step goes: a `jax.profiler` trace of kdflax's jitted step,
each executed XLA op attributed to the model part and pass its HLO metadata names.

    .venv/bin/python tools/profile_step.py [--row student|kd] [--size 224]
        [--batch 16] [--steps 3] [--top 15] [--json PATH]

The step is `tools/bench_train.py`'s (same models, losses, optimizer, random batch): after
three untimed steps, `--steps` steps run under `jax.profiler.trace`; the trace's XLA op events
(the thunks XLA:CPU's worker threads execute) are matched by name to the compiled HLO's
top-level instructions, whose `op_name` metadata carries the Flax module path and the pass
(`jvp(...)`: forward, `transpose(jvp(...))`: backward, neither: the optimizer update, gradient
clipping and metrics, or the frozen teacher). Times are per step, summed over the worker threads
(so the total is about threads x wall time). Prints one table (part x pass) and the slowest
fused ops.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_train  # noqa: E402  (the benchmark's step, config and batch)

PASSES = ('forward', 'backward', 'update')
# (part, pattern on the op_name), first match wins.
PARTS = (
    ('teacher', re.compile(r'SwinTransformer|VisionTransformer')),
    ('depthwise conv', re.compile(r'/conv_dw/')),
    ('squeeze-excite', re.compile(r'/se/')),
    ('batch norm', re.compile(r'/bn\d?/|/bn_\w+/')),
    ('activations', re.compile(r'hard_silu|hard_sigmoid|hard_swish|relu')),
    ('dense conv', re.compile(r'conv_general_dilated|/conv_\w+/')),
    ('dropout', re.compile(r'Dropout')),
    ('loss', re.compile(r'Objective|log_softmax|softmax|cross_entropy|kd|attention')),
)
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its `op_name` metadata, for every instruction of the HLO module."""
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def classify(op_name: str) -> tuple[str, str]:
  """`(part, pass)` of an HLO op from its `op_name` (see the module docstring)."""
  if 'transpose(jvp(' in op_name:
    phase = 'backward'
  elif 'jvp(' in op_name:
    phase = 'forward'
  else:
    phase = 'update'
  for part, pattern in PARTS:
    if pattern.search(op_name):
      return part, ('forward' if part == 'teacher' else phase)
  return ('optimizer + metrics' if phase == 'update' else 'other'), phase


def build_step(row: str, size: int, batch: int):
  """`tools/bench_train.py`'s jitted step for `row`, its state, teacher variables and batch."""
  args = bench_train.parse_args(['--rows', row, '--size', str(size), '--batches', str(batch)])
  return bench_train.kdflax_step(args, bench_train.plan_cells(args)[0])


def profile(row: str, size: int, batch: int, steps: int) -> dict[str, Any]:
  """Per-step milliseconds of every executed op, by (part, pass), from one trace."""
  import jax
  step, state, teacher, device_batch = build_step(row, size, batch)
  names = op_names(step.lower(state, teacher, device_batch).compile().as_text())
  for _ in range(3):
    state, metrics = step(state, teacher, device_batch)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory(prefix='profile_step_trace_') as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        state, metrics = step(state, teacher, device_batch)
      jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / steps
    result = attribute(trace_dir, names, steps)
  return {'row': row, 'size': size, 'batch': batch, 'steps': steps, 'wall_ms': wall * 1e3,
          **result}


def attribute(trace_dir: str, names: dict[str, str], steps: int) -> dict[str, Any]:
  """Per-step ms of the XLA ops in the trace under `trace_dir`, by `classify` of their
  `op_name` (`names`, from `op_names`) and by op; events of other names are skipped."""
  import jax
  (path,) = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  data = jax.profiler.ProfileData.from_file(path)
  by_part, by_op, threads = collections.Counter(), collections.Counter(), set()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        op_name = names.get(event.name)
        if op_name is None:
          continue
        threads.add(line.name)
        ms = event.duration_ns / 1e6 / steps
        by_part[classify(op_name)] += ms
        by_op[(event.name, op_name)] += ms
  return {'threads': len(threads),
          'parts': {f'{part}|{phase}': ms for (part, phase), ms in by_part.items()},
          'ops': [{'op': op, 'op_name': name, 'ms': ms}
                  for (op, name), ms in by_op.most_common()]}


def table(result: dict[str, Any], top: int) -> str:
  """The part x pass table and the `top` slowest ops, as text."""
  parts = collections.defaultdict(dict)
  for key, ms in result['parts'].items():
    part, phase = key.split('|')
    parts[part][phase] = ms
  total = sum(result['parts'].values())
  lines = [f"{result['row']} step, {result['size']} px, batch {result['batch']}: "
           f"{result['wall_ms']:.1f} ms wall per step; ops summed over "
           f"{result['threads']} worker thread(s): {total:.1f} ms", '',
           f"| part | {' | '.join(f'{p} ms' for p in PASSES)} | total ms | share |",
           '|---|' + '---:|' * (len(PASSES) + 2)]
  for part, phases in sorted(parts.items(), key=lambda kv: -sum(kv[1].values())):
    cells = ' | '.join(f'{phases.get(p, 0.0):.1f}' for p in PASSES)
    lines.append(f'| {part} | {cells} | {sum(phases.values()):.1f} | '
                 f'{100 * sum(phases.values()) / total:.1f}% |')
  lines += ['', f'slowest {top} ops (ms per step, summed over threads):']
  for op in result['ops'][:top]:
    lines.append(f"  {op['ms']:8.2f}  {op['op']:<28} {op['op_name'][:90]}")
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--row', choices=('student', 'kd'), default='student')
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--json', metavar='PATH', help='also write the result as JSON')
  args = parser.parse_args(argv)
  result = profile(args.row, args.size, args.batch, args.steps)
  print(table(result, args.top))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
