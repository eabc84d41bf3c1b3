"""PyTorch/timm half of `tools/bench_train.py`: one train-step timing, one JSON line out.

    .venv/bin/python tools/bench_train_torch.py --step kd --size 224 --batch 16 [--compile]
        [--steps 10] [--warmup 2] [--teacher swin_tiny_patch4_window7_224] [--teacher-size PX]
        [--student mobilenetv3_large_100] [--num-classes 10] [--temperature 4]
        [--lr 1e-3] [--weight-decay 0.05] [--grad-clip 1.0]

Run by `bench_train.py` as a child process: it imports PyTorch and timm only (no TensorFlow,
no kdflax: importing torchvision after TensorFlow segfaults in the pinned toolchain). Prints
`{"images_per_s", "step_s", "first_step_s", "torch", "timm", ...}` or `{"error": "..."}`.

The steps mirror kdflax's (see `bench_train.py`), on random weights and a fixed random batch:
  kd        teacher forward (eval, no grad) + student forward/backward (train mode) + CE +
            logit KD + attention transfer over 4 stage pairs + gradient clipping + AdamW
  student   student forward/backward + CE + gradient clipping + AdamW
  kd_given  `kd` with the teacher's logits and (student-grid) stage maps given as inputs
Teachers: timm Swin (stage outputs, NHWC, built at `img_size` = the teacher size) or a timm
CNN, `efficientnet_lite*` / `mobilenetv3_*` (the stride 4, 8, 16, 32 block outputs of timm's
`feature_info`, NCHW, as kdflax's `stage0..3`); the student's stages are found the same way.
Images are NCHW in [0, 1], normalised inside the step (kdflax models normalise inside too;
ImageNet's mean/std for every model here). With `--teacher-size` other than `--size`, the
teacher reads its own random image of that size (kdflax's `teacher_image`, which its pipeline
makes at the teacher's resolution).
Attention transfer is kdflax's `l2` map distance: maps `mean_c F^2`, the teacher's resized to
the student grid with kdflax's interpolation (area down, bilinear up; the identity when the
grids agree, as they do for Swin vs MobileNetV3 stages at one size), flattened,
L2-normalised (eps 1e-12), squared difference averaged over positions and batch, summed over
the pairs.
`--compile` wraps the loss function (forward passes and losses; AOTAutograd compiles the
backward) in `torch.compile`; the optimizer step stays eager. Its first step is the compile.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

# The resize weights of the kdflax side (a NumPy function; importing it loads JAX, never
# TensorFlow, which must not share a process with PyTorch).
from kdflax.distill.attention import resize_matrix

CNN_TEACHERS = ('efficientnet', 'mobilenetv3')  # timm name prefixes: `cnn_forward` teachers
STAGE_STRIDES = (4, 8, 16, 32)  # kdflax's stage0..3


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--step', choices=('kd', 'student', 'kd_given'), required=True)
  parser.add_argument('--size', type=int, required=True)
  parser.add_argument('--batch', type=int, required=True)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--compile', action='store_true')
  parser.add_argument('--teacher', default='swin_tiny_patch4_window7_224')
  parser.add_argument('--teacher-size', type=int, help="the teacher's image size (default: --size)")
  parser.add_argument('--student', default='mobilenetv3_large_100')
  parser.add_argument('--num-classes', type=int, default=10)
  parser.add_argument('--temperature', type=float, default=4.0)
  parser.add_argument('--weights', type=float, nargs=3, default=(1.0, 1.0, 1.0),
                      metavar=('CE', 'KD', 'AT'))
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--weight-decay', type=float, default=0.05)
  parser.add_argument('--grad-clip', type=float, default=1.0)
  parser.add_argument('--student-drop-rate', type=float, default=0.2)
  return parser.parse_args(argv)


def align(maps, size: tuple[int, int]):
  """`(B, H, W)` -> `(B, h, w)` as kdflax's `align` (unchanged when the sizes agree)."""
  import torch
  if tuple(maps.shape[1:]) == tuple(size):
    return maps
  rows = torch.from_numpy(resize_matrix(maps.shape[1], size[0])).to(maps.dtype)
  cols = torch.from_numpy(resize_matrix(maps.shape[2], size[1])).to(maps.dtype)
  return torch.einsum('hH,bHW,wW->bhw', rows, maps, cols)


def map_distance(student_maps, teacher_maps):
  """kdflax `map_distance(..., 'l2')`: mean squared difference of L2-normalised flat maps."""
  import torch.nn.functional as F
  s = F.normalize(student_maps.flatten(1), dim=-1, eps=1e-12)
  t = F.normalize(teacher_maps.flatten(1), dim=-1, eps=1e-12)
  return (s - t).pow(2).mean()


def kd_loss(student_logits, teacher_logits, temperature: float):
  """`T^2 * mean_b KL(softmax(t / T) || softmax(s / T))`."""
  import torch.nn.functional as F
  s = F.log_softmax(student_logits / temperature, dim=-1)
  t = F.log_softmax(teacher_logits / temperature, dim=-1)
  return temperature**2 * F.kl_div(s, t, log_target=True, reduction='batchmean')


def stage_blocks(model) -> tuple[int, ...]:
  """Indices into `model.blocks` of a timm MobileNetV3 / EfficientNet's stride 4..32 outputs
  (timm's `feature_info`: MobileNetV3-Large and EfficientNet (1, 2, 4, 6), -Small (0, 1, 3, 5),
  as kdflax's `FEATURE_STAGES`)."""
  blocks = tuple(int(f['module'].split('.')[1]) for f in model.feature_info
                 if f['module'].startswith('blocks.') and f['reduction'] in STAGE_STRIDES)
  if len(blocks) != len(STAGE_STRIDES):
    raise ValueError(f'{type(model).__name__}: no stride {STAGE_STRIDES} blocks in feature_info')
  return blocks


def cnn_forward(model) -> Callable:
  """`forward(x) -> (logits, 4 feature stages (NCHW))` of a timm MobileNetV3 / EfficientNet."""
  from timm.models.efficientnet import EfficientNet
  stages = stage_blocks(model)
  head_conv = isinstance(model, EfficientNet)  # its head conv comes before the pool

  def forward(x):
    x = model.bn1(model.conv_stem(x))
    feats = []
    for i, block in enumerate(model.blocks):
      x = block(x)
      if i in stages:
        feats.append(x)
    if head_conv:
      x = model.bn2(model.conv_head(x))
    return model.forward_head(x), feats

  return forward


def is_cnn_teacher(name: str) -> bool:
  return name.startswith(CNN_TEACHERS)


def teacher_forward(model, cnn: bool) -> Callable:
  """`forward(x) -> (logits, 4 stage maps mean_c F^2 (B, H, W))` of the teacher: timm Swin
  (stage outputs, NHWC in timm 1.0) or, with `cnn`, a `CNN_TEACHERS` model (NCHW stages)."""
  if cnn:
    features = cnn_forward(model)

    def forward(x):
      logits, feats = features(x)
      return logits, [f.pow(2).mean(dim=1) for f in feats]

    return forward

  def swin_forward(x):
    x = model.patch_embed(x)
    feats = []
    for layer in model.layers:
      x = layer(x)
      feats.append(x)
    return model.forward_head(model.norm(x)), [f.pow(2).mean(dim=-1) for f in feats]

  return swin_forward


def make_loss_fn(args: argparse.Namespace, student: Callable, teacher: Callable | None, mean,
                 std) -> Callable:
  """`loss(images, labels, teacher_images, teacher_logits, teacher_maps) -> scalar` for
  `args.step`, given the student's and teacher's forward functions (`cnn_forward`,
  `teacher_forward`); teacher images None: the teacher reads `images`."""
  import torch
  import torch.nn.functional as F
  w_ce, w_kd, w_at = args.weights

  def loss_fn(images, labels, teacher_images=None, given_logits=None, given_maps=None):
    x = (images - mean) / std
    logits, feats = student(x)
    loss = w_ce * F.cross_entropy(logits, labels)
    if args.step == 'student':
      return loss
    if args.step == 'kd':
      tx = x if teacher_images is None else (teacher_images - mean) / std
      with torch.no_grad():
        t_logits, t_maps = teacher(tx)
    else:
      t_logits, t_maps = given_logits, given_maps
    loss = loss + w_kd * kd_loss(logits, t_logits, args.temperature)
    at = 0.0
    for f, t_map in zip(feats, t_maps, strict=True):
      s_map = f.pow(2).mean(dim=1)
      at = at + map_distance(s_map, align(t_map, tuple(s_map.shape[1:])))
    return loss + w_at * at

  return loss_fn


def make_optimizer(args: argparse.Namespace, model):
  """AdamW with weight decay on matrices and conv kernels only, as kdflax's."""
  import torch
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.AdamW([{'params': decay, 'weight_decay': args.weight_decay},
                            {'params': no_decay, 'weight_decay': 0.0}],
                           lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


def build(args: argparse.Namespace):
  """Models, optimizer, the (maybe compiled) step and a fixed random batch."""
  import timm
  import torch
  torch.manual_seed(0)
  student = timm.create_model(args.student, pretrained=False, num_classes=args.num_classes,
                              drop_rate=args.student_drop_rate).train()
  teacher = None
  if args.step == 'kd':
    size = {} if is_cnn_teacher(args.teacher) else {'img_size': args.teacher_size or args.size}
    teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.num_classes,
                                **size).eval()
    teacher.requires_grad_(False)
  cfg = student.pretrained_cfg
  mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
  std = torch.tensor(cfg['std']).view(1, 3, 1, 1)
  forward = teacher_forward(teacher, is_cnn_teacher(args.teacher)) if teacher else None
  loss_fn = make_loss_fn(args, cnn_forward(student), forward, mean, std)
  if args.compile:
    loss_fn = torch.compile(loss_fn)
  params = list(student.parameters())
  optimizer = make_optimizer(args, student)

  def step(images, labels, teacher_images, given_logits, given_maps):
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(images, labels, teacher_images, given_logits, given_maps)
    loss.backward()
    if args.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    return loss.detach()

  gen = torch.Generator().manual_seed(1)
  images = torch.rand(args.batch, 3, args.size, args.size, generator=gen)
  labels = torch.randint(0, args.num_classes, (args.batch,), generator=gen)
  teacher_images = given_logits = given_maps = None
  if args.step == 'kd' and args.teacher_size not in (None, args.size):
    teacher_images = torch.rand(args.batch, 3, args.teacher_size, args.teacher_size,
                                generator=gen)
  if args.step == 'kd_given':
    with torch.no_grad():
      _, feats = cnn_forward(student.eval())(images[:1])
    student.train()
    given_logits = torch.randn(args.batch, args.num_classes, generator=gen)
    given_maps = [torch.rand(args.batch, *f.shape[2:], generator=gen) for f in feats]
  return step, (images, labels, teacher_images, given_logits, given_maps)


def measure(args: argparse.Namespace) -> dict:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  step, batch = build(args)
  start = time.perf_counter()
  step(*batch).item()
  first_step_s = time.perf_counter() - start
  for _ in range(args.warmup):
    step(*batch)
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step(*batch)
  loss.item()
  step_s = (time.perf_counter() - start) / args.steps
  return {'images_per_s': args.batch / step_s, 'step_s': step_s,
          'first_step_s': first_step_s, 'loss': float(loss),
          'threads': torch.get_num_threads()}


def one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:200]


def main(argv: list[str]) -> int:
  args = parse_args(argv)
  import timm
  import torch
  versions = {'torch': torch.__version__, 'timm': timm.__version__}
  try:
    result = measure(args)
  except Exception as e:  # noqa: BLE001 - reported as the table cell, e.g. a compile failure.
    result = {'error': one_line(e)}
  print(json.dumps({**result, **versions}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
