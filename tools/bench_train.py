"""Training-step throughput of kdflax vs the same step in PyTorch/timm, measured in one run.

    .venv/bin/python tools/bench_train.py [--rows kd student kd_given] [--size PX]
        [--batches 16 32] [--steps 10] [--warmup 2] [--no-kdflax] [--no-torch]
        [--no-torch-compile] [--compile-timeout 900] [--teacher swin_tiny_patch4_window7_224]
        [--teacher-size PX] [--student mobilenetv3_large_100] [--json PATH]

    # the beans recipe's models and sizes (EfficientNet-Lite0 at 128 px -> MobileNetV3-Small
    # 0.5 at 64 px, batch 32):
    .venv/bin/python tools/bench_train.py --teacher efficientnet_lite0 --teacher-size 128 \
        --student mobilenetv3_small_050 --size 64 --batches 32
    # tiny check (kdflax side only, the tiny test Swin):
    .venv/bin/python tools/bench_train.py --size 64 --batches 4 --steps 2 --warmup 1 \
        --teacher swin_test_patch4_window4_64 --no-torch
    # tiny check (PyTorch side only; timm's Swin-T needs 112 or 224 px):
    .venv/bin/python tools/bench_train.py --size 112 --batches 2 --steps 1 --warmup 0 \
        --no-kdflax --no-torch-compile

Rows (default: all, at the sizes below; `--size` / `--batches` replace a row kind's sizes /
batch sizes, giving every combination):
  kd        the distillation step: teacher forward (eval, no gradient) + student
            forward/backward (train mode) + CE + logit KD (T = 4) + attention transfer
            (teacher stage i -> student stage i, i = 0..3, maps mean_c F^2, teacher resized
            to the student grid, 'l2' map distance) + AdamW; 10 classes, loss weights
            1 / 1 / 1. 224 px at batch 16 and 32, 112 px at 32. Teachers: Swin (stage
            outputs; built for the teacher's size) or EfficientNet-Lite (`efficientnet_lite*`:
            the stride 4..32 feature maps), at `--teacher-size` (its own random image, as the
            pipeline's `teacher_image`) or the row's size.
  student   the baseline step: student (default MobileNetV3-Large) forward/backward + CE +
            AdamW (224 px, 16, 32).
  kd_given  `kd` with the teacher's outputs given as inputs (what a teacher-output cache
            feeds: logits (B, 10) and the 4 teacher maps at the student grids): no teacher
            forward. Same sizes as `kd`.

kdflax side: built from `base_config()` with `prepare_stage(config, 'distill',
random_teacher=True)` (kd) or `prepare_stage(config, 'student')` (student), so the library's
real jitted step (shardings, state donation, gradient clipping, metrics) is what is timed, on
a fixed random batch already on the device. The data section points at a throw-away folder of
tiny PNGs in 10 class folders (never read: it only fixes the class count at 10).
kdflax has no way to pass teacher outputs into its train step, so `kd_given` wraps the
library's unjitted step body (`make_train_step(student, None, loss_fn, mesh, jit=False)`) with
a `loss_fn` that calls the same `Objective.apply` on the teacher logits and maps carried in
the batch, and jits it with the library's shardings and donation. The objective compares
(B, H, W, C) features, so a cached map q is fed as the 1-channel feature sqrt(q) (computed on
the host), whose map mean_c F^2 (p = 2) is q again.

PyTorch side (`tools/bench_train_torch.py`, a child process per cell: PyTorch must not share
a process with TensorFlow): `timm.create_model(..., pretrained=False, num_classes=10)`, eager,
and, unless `--no-torch-compile`, a `torch.compile` variant (the loss function compiled; a
failure or a compile running past `--compile-timeout` is reported in its cell). Same losses,
AdamW with the kdflax config's peak learning rate, betas, weight decay (matrices only) and
gradient clipping (kdflax's warm-up + cosine schedule is a constant rate there: no effect on
speed), the student's dropout 0.2 as kdflax's, `torch.set_num_threads(os.cpu_count())`.

Timing, each side with the machine to itself (one after the other): the first step (compile),
`--warmup` more steps, then `--steps` timed steps ending in a device sync;
images/s = batch * steps / time. The table's ratios are kdflax / PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_CHILD = os.path.join(ROOT, 'tools', 'bench_train_torch.py')
STEPS = ('kd', 'student', 'kd_given')
DEFAULT_CELLS = {
    'kd': ((224, 16), (224, 32), (112, 32)),
    'student': ((224, 16), (224, 32)),
    'kd_given': ((224, 16), (224, 32), (112, 32)),
}
NUM_CLASSES = 10
TEMPERATURE = 4.0
LOSS_WEIGHTS = (1.0, 1.0, 1.0)  # ce, kd, attention
NUM_STAGES = 4


@dataclasses.dataclass(frozen=True)
class Cell:
  step: str
  size: int
  batch: int


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', nargs='+', choices=STEPS, default=list(STEPS),
                      help='which steps to measure (default: all)')
  parser.add_argument('--size', type=int, help='image size for every row (default: per row)')
  parser.add_argument('--batches', type=int, nargs='+', help='batch sizes (default: per row)')
  parser.add_argument('--steps', type=int, default=10, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after the first')
  parser.add_argument('--teacher', default='swin_tiny_patch4_window7_224',
                      help='a Swin or efficientnet_lite* preset (kdflax registry; the timm '
                           'model of that name on the PyTorch side)')
  parser.add_argument('--teacher-size', type=int,
                      help="the teacher's image size in kd rows (default: the row's size)")
  parser.add_argument('--student', default='mobilenetv3_large_100')
  parser.add_argument('--kdflax', action=argparse.BooleanOptionalAction, default=True,
                      help='measure the kdflax side')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                      help='measure the PyTorch side')
  parser.add_argument('--torch-compile', action=argparse.BooleanOptionalAction, default=True,
                      help='also measure a torch.compile variant')
  parser.add_argument('--compile-timeout', type=float, default=900,
                      help='seconds allowed for torch.compile; the compiled cell may run this '
                           'plus max(60 s, 3x the eager time of its steps)')
  parser.add_argument('--torch-timeout', type=float, default=3600,
                      help='seconds allowed for an eager PyTorch cell')
  parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
  return parser.parse_args(argv)


def plan_cells(args: argparse.Namespace) -> list[Cell]:
  """The rows to measure, in order."""
  cells = []
  for step in args.rows:
    defaults = DEFAULT_CELLS[step]
    if args.size is None and not args.batches:
      pairs = list(defaults)
    else:
      sizes = [args.size] if args.size else sorted({s for s, _ in defaults}, reverse=True)
      batches = args.batches or sorted({b for _, b in defaults})
      pairs = [(s, b) for s in sizes for b in batches]
    cells += [Cell(step, s, b) for s, b in pairs]
  return cells


# ---------------------------------------------------------------------------- kdflax side


def write_class_folder(root: str, images_per_class: int) -> None:
  """`root/train/class_i/*.png`: the smallest folder dataset with NUM_CLASSES classes."""
  from PIL import Image
  pixel = np.zeros((4, 4, 3), np.uint8)
  for c in range(NUM_CLASSES):
    folder = os.path.join(root, 'train', f'class_{c}')
    os.makedirs(folder, exist_ok=True)
    for i in range(images_per_class):
      Image.fromarray(pixel).save(os.path.join(folder, f'{i}.png'))


def make_config(args: argparse.Namespace, cell: Cell, data_root: str):
  """`base_config()` with the benchmark's models, sizes and loss."""
  from kdflax.config import base_config
  from kdflax.models.registry import model_spec
  config = base_config()
  config.data.root = data_root
  config.data.eval_split = ''
  config.data.batch_size = cell.batch
  config.data.cache = False
  config.model.name = args.student
  config.model.image_size = cell.size
  config.teacher.name = args.teacher
  config.teacher.image_size = teacher_px = args.teacher_size or cell.size
  if 'img_size' in model_spec(args.teacher).kwargs:  # Swin: built for its input size
    config.teacher.overrides = {'img_size': teacher_px}
  config.train.num_steps = 1000
  config.train.progress = False
  w_ce, w_kd, w_at = LOSS_WEIGHTS
  config.loss.ce.weight = w_ce
  config.loss.kd.weight = w_kd
  config.loss.kd.temperature = TEMPERATURE
  config.loss.attention.weight = w_at
  config.loss.attention.p = 2.0
  config.loss.attention.normalize = 'l2'
  config.loss.attention.pairs = {f'stage{i}': {'teacher': f'stage{i}', 'student': f'stage{i}'}
                                 for i in range(NUM_STAGES)}
  return config


def student_grids(setup) -> list[tuple[int, int]]:
  """`(h, w)` of the student's stage0..3 at the setup's resolution."""
  from kdflax.train.stages import intermediates_shapes
  variables = {'params': setup.state.params['student'], 'batch_stats': setup.state.batch_stats}
  shapes = intermediates_shapes(setup.module, variables, setup.description.image_size)
  return [tuple(shapes[f'stage{i}'][0].shape[1:3]) for i in range(NUM_STAGES)]


def given_teacher_step(config, setup):
  """The jitted `kd_given` step: the library's step body, teacher outputs read from the batch."""
  import jax

  from kdflax.distill.objective import Objective
  from kdflax.models.layout import layout_of
  from kdflax.train.stages import intermediates_shapes, stage_loss_config
  from kdflax.train.step import batch_sharding, make_train_step, replicated

  grids = student_grids(setup)
  teacher_shapes = {f'stage{i}': (jax.ShapeDtypeStruct((1, h, w, 1), np.float32),)
                    for i, (h, w) in enumerate(grids)}
  variables = {'params': setup.state.params['student'], 'batch_stats': setup.state.batch_stats}
  objective = Objective(
      stage_loss_config(config, 'distill'), teacher_shapes,
      intermediates_shapes(setup.module, variables, setup.description.image_size),
      student_layout=layout_of(setup.module))

  def step(state, batch):
    t_inter = {f'stage{i}': (batch[f'teacher_stage{i}'],) for i in range(NUM_STAGES)}

    def loss_fn(adapters, logits, inter, _t_logits, _t_inter, labels, **kwargs):
      return objective.apply(adapters, logits, inter, batch['teacher_logits'], t_inter, labels,
                             **kwargs)

    return make_train_step(setup.module, None, loss_fn, setup.mesh, jit=False)(
        state, None, batch)

  mesh = setup.mesh
  jitted = jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))
  return lambda state, _teacher, batch: jitted(state, batch), grids


def random_batch(cell: Cell, grids: list[tuple[int, int]] | None,
                 teacher_size: int | None = None) -> dict[str, np.ndarray]:
  """A fixed random batch; with `grids`, also cached teacher logits and sqrt(maps); with a
  `teacher_size` other than the cell's, a `teacher_image` of that size (the pipeline's)."""
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(0, 1, (cell.batch, cell.size, cell.size, 3)).astype(np.float32),
           'label': rng.integers(0, NUM_CLASSES, cell.batch).astype(np.int32)}
  if grids is not None:
    batch['teacher_logits'] = rng.normal(size=(cell.batch, NUM_CLASSES)).astype(np.float32)
    for i, (h, w) in enumerate(grids):
      maps = rng.uniform(0, 1, (cell.batch, h, w)).astype(np.float32)
      batch[f'teacher_stage{i}'] = np.sqrt(maps)[..., None]
  if teacher_size and teacher_size != cell.size:
    shape = (cell.batch, teacher_size, teacher_size, 3)
    batch['teacher_image'] = rng.uniform(0, 1, shape).astype(np.float32)
  return batch


def time_steps(step, state, teacher, batch, warmup: int, steps: int) -> dict[str, float]:
  """First step (compile), `warmup` steps, then `steps` timed steps."""
  import jax
  start = time.perf_counter()
  state, metrics = step(state, teacher, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = step(state, teacher, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, teacher, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps
  return {'step_s': step_s, 'first_step_s': compile_s, 'loss': float(metrics['loss'])}


def kdflax_step(args: argparse.Namespace, cell: Cell) -> tuple[Callable, Any, Any, Any]:
  """The library's jitted step of `cell`, its state, teacher variables and batch on the
  device: `step(state, teacher, batch) -> (state, metrics)` (the state is donated)."""
  from kdflax.train.loop import to_global
  from kdflax.train.stages import prepare_stage

  with tempfile.TemporaryDirectory(prefix='bench_train_data_') as root:
    write_class_folder(root, math.ceil(cell.batch / NUM_CLASSES))
    config = make_config(args, cell, root)
    stage = 'distill' if cell.step == 'kd' else 'student'
    setup = prepare_stage(config, stage, random_teacher=cell.step == 'kd',
                          log_fn=lambda _: None)
  step, grids = setup.train_step, None
  if cell.step == 'kd_given':
    step, grids = given_teacher_step(config, setup)
  teacher_size = setup.teacher_size if cell.step == 'kd' else None
  batch = to_global(random_batch(cell, grids, teacher_size), setup.mesh)
  return step, setup.state, setup.teacher_variables, batch


def measure_kdflax(args: argparse.Namespace, cell: Cell) -> dict[str, Any]:
  step, state, teacher, batch = kdflax_step(args, cell)
  result = time_steps(step, state, teacher, batch, args.warmup, args.steps)
  result['images_per_s'] = cell.batch / result['step_s']
  return result


# ---------------------------------------------------------------------------- PyTorch side


def torch_child_args(args: argparse.Namespace, cell: Cell, compile_: bool) -> list[str]:
  from kdflax.config.schema import default_optim_config
  optim = default_optim_config()
  out = ['--step', cell.step, '--size', str(cell.size), '--batch', str(cell.batch),
         '--steps', str(args.steps), '--warmup', str(args.warmup),
         '--teacher', args.teacher, '--student', args.student,
         '--num-classes', str(NUM_CLASSES), '--temperature', str(TEMPERATURE),
         '--weights', *map(str, LOSS_WEIGHTS), '--lr', str(optim.learning_rate),
         '--weight-decay', str(optim.weight_decay), '--grad-clip', str(optim.grad_clip_norm)]
  out += ['--teacher-size', str(args.teacher_size)] if args.teacher_size else []
  return out + (['--compile'] if compile_ else [])


def run_torch(args: argparse.Namespace, cell: Cell, compile_: bool,
              timeout: float) -> dict[str, Any]:
  """One PyTorch cell in a child process (no TensorFlow there); `{'error': ...}` on failure."""
  env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
  cmd = [sys.executable, TORCH_CHILD, *torch_child_args(args, cell, compile_)]
  # Own process group: a timeout also ends torch.compile's compile workers.
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    what = 'compile + steps' if compile_ else 'steps'
    return {'error': f'timed out: {what} ran past {timeout:.0f} s'}
  lines = [line for line in stdout.splitlines() if line.startswith('{')]
  if proc.returncode != 0 or not lines:
    tail = [line for line in stderr.strip().splitlines() if line.strip()]
    return {'error': f'exit {proc.returncode}: {tail[-1] if tail else "no output"}'[:200]}
  return json.loads(lines[-1])


def measure_torch(args: argparse.Namespace, cell: Cell) -> dict[str, dict[str, Any]]:
  out = {'eager': run_torch(args, cell, False, args.torch_timeout)}
  if args.torch_compile:
    eager_s = out['eager'].get('step_s')
    runs = args.steps + args.warmup
    timeout = args.compile_timeout + (max(60.0, 3 * eager_s * runs) if eager_s
                                      else args.torch_timeout)
    out['compile'] = run_torch(args, cell, True, timeout)
  return out


# ---------------------------------------------------------------------------- report


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def versions() -> dict[str, str]:
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'timm'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def header(args: argparse.Namespace) -> str:
  import jax
  v = ', '.join(f'{k} {val}' for k, val in versions().items())
  teacher_at = f'{args.teacher_size} px' if args.teacher_size else "the row's size"
  return (f'machine: {os.cpu_count()} CPUs ({cpu_name()}), {platform.platform()}, '
          f'JAX backend {jax.default_backend()}; {v}\n'
          f'teacher {args.teacher} at {teacher_at} (kd rows), '
          f'student {args.student}, {NUM_CLASSES} classes, '
          f'{args.steps} timed steps after {args.warmup} warm-up')


def cell_text(result: dict[str, Any] | None) -> str:
  if result is None:
    return '-'
  if 'error' in result:
    return f'n/a ({result["error"].replace("|", "/")})'
  return f'{result["images_per_s"]:.1f}'


def ratio_text(kdflax: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
  if not kdflax or not other or 'images_per_s' not in other or 'images_per_s' not in kdflax:
    return '-'
  return f'{kdflax["images_per_s"] / other["images_per_s"]:.2f}'


def table(rows: list[dict[str, Any]]) -> str:
  lines = ['| step | size | batch | kdflax img/s | PyTorch eager img/s | ratio | '
           'torch.compile img/s | ratio |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    eager, comp = r.get('torch_eager'), r.get('torch_compile')
    lines.append(f'| {r["step"]} | {r["size"]} | {r["batch"]} | {cell_text(r["kdflax"])} | '
                 f'{cell_text(eager)} | {ratio_text(r["kdflax"], eager)} | '
                 f'{cell_text(comp)} | {ratio_text(r["kdflax"], comp)} |')
  return '\n'.join(lines)


def one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:200]


def measure_cell(args: argparse.Namespace, cell: Cell) -> dict[str, Any]:
  row: dict[str, Any] = dataclasses.asdict(cell)
  row['kdflax'] = None
  if args.kdflax:
    try:
      row['kdflax'] = measure_kdflax(args, cell)
    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others.
      row['kdflax'] = {'error': one_line(e)}
  if args.torch:
    torch_results = measure_torch(args, cell)
    row['torch_eager'] = torch_results['eager']
    if 'compile' in torch_results:
      row['torch_compile'] = torch_results['compile']
  return row


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  rows = []
  for cell in plan_cells(args):
    print(f'measuring {cell.step} {cell.size} px batch {cell.batch} ...', file=sys.stderr,
          flush=True)
    rows.append(measure_cell(args, cell))
  head = header(args)
  print(head)
  print()
  print(table(rows))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'header': head, 'machine': {'cpus': os.cpu_count(), 'cpu': cpu_name(),
                                             'platform': platform.platform()},
                 'versions': versions(), 'settings': vars(args), 'rows': rows}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
