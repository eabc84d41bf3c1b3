"""Teacher vs student attention on a few photos: what the attention term compares.

    photos, maps, captions = attention_pictures(config, 'runs/x/teacher/model_best',
                                                'runs/x/distill/model_best', num_images=4)
    save_figure(attention_grid(photos, maps, captions), 'runs/x/figures/attention.png')

For each pair of `config.loss.attention.pairs` compared as maps, the teacher's spatial map
(Swin window attention received per token, or a CNN/ViT activation map) aligned to the
student's grid, next to the student's activation map, exactly as `Objective` computes them
for the loss (`Objective.attention_maps`). Maps are min-max scaled per picture for display.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def _forward(model_dir: str, photos: np.ndarray):
  """-> (module, variables, logits (N, K), intermediates) of a model directory on uint8 photos."""
  from kdflax.train.checkpoint import load_model
  info, variables = load_model(model_dir)
  module, _ = info.create(dtype=jnp.float32)
  x = jnp.asarray(photos, jnp.float32) / 255.0
  # One compiled program; applied op by op, a Swin-L compiles hundreds of small ones.
  apply = jax.jit(lambda v, images: module.apply(v, images, train=False,
                                                 mutable=['intermediates']))
  logits, state = apply(variables, x)
  return info, module, variables, np.asarray(logits), state['intermediates']


def attention_pictures(config: ml_collections.ConfigDict, teacher_dir: str, student_dir: str,
                       num_images: int = 4, split: str | None = None
                       ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]],
                                  list[str]]:
  """Runs both models on `num_images` photos of `split` (default: the eval split).

  Returns:
    `(photos (N, S_s, S_s, 3) uint8 at the student's size, {pair: (student (N, h, w),
    teacher (N, h, w))}, captions)`; a caption names the true class and the student's guess.

  Raises:
    ValueError: no attention pair is configured, or the split has no photos.
  """
  from kdflax.data.photos import split_photos
  from kdflax.data.pipeline import source_from_config
  from kdflax.distill.objective import Objective
  from kdflax.models.layout import layout_of
  from kdflax.train.checkpoint import read_model_info
  from kdflax.train.stages import intermediates_shapes, stage_loss_config

  loss = stage_loss_config(config, 'distill')
  if not loss['attention']['pairs']:
    raise ValueError('config.loss.attention.pairs is empty: there is no attention to picture')
  loss['attention']['weight'] = loss['attention']['weight'] or 1.0  # pairs at weight 0 too
  split = split or config.data.eval_split or config.data.train_split
  sizes = [read_model_info(d).image_size for d in (teacher_dir, student_dir)]
  source = source_from_config(config.data)  # read once for both sizes
  t_photos, labels, names = split_photos(source, split, sizes[0], num_images)
  s_photos, _, _ = split_photos(source, split, sizes[1], num_images)
  _, t_module, t_vars, _, t_int = _forward(teacher_dir, t_photos)
  s_info, s_module, s_vars, s_logits, s_int = _forward(student_dir, s_photos)
  objective = Objective(loss, intermediates_shapes(t_module, t_vars, sizes[0]),
                        intermediates_shapes(s_module, s_vars, sizes[1]),
                        teacher_layout=layout_of(t_module),
                        student_layout=layout_of(s_module))
  maps = {name: tuple(np.asarray(m, np.float32) for m in pair)
          for name, pair in objective.attention_maps(s_int, t_int).items()}
  if not maps:
    raise ValueError('no attention pair of config.loss.attention.pairs compares maps '
                     "(distance 'feature' pairs have no map to picture)")
  guesses = [s_info.labels[i] if s_info.labels else str(i) for i in s_logits.argmax(-1)]
  captions = [f'true: {names[y]}\nstudent: {g}' for y, g in zip(labels, guesses, strict=True)]
  return s_photos, maps, captions


def _scaled(m: np.ndarray) -> np.ndarray:
  lo, hi = float(m.min()), float(m.max())
  return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def attention_grid(photos: np.ndarray, maps: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   captions: Sequence[str] = ()):
  """A Matplotlib figure: one row per photo; the photo, then teacher and student map per pair.

  Args:
    photos: `(N, S, S, 3)` uint8.
    maps: pair name -> `(student (N, h, w), teacher (N, h, w))`.
    captions: N row captions.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  n, cols = len(photos), 1 + 2 * len(maps)
  fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.8 * n), squeeze=False)
  for row in range(n):
    axes[row, 0].imshow(photos[row])
    if captions:
      lines = [textwrap.shorten(x.replace('___', ' '), 30) for x in captions[row].splitlines()]
      axes[row, 0].set_title('\n'.join(lines), fontsize=6)
    for j, (name, (student, teacher)) in enumerate(sorted(maps.items())):
      for k, (who, m) in enumerate((('teacher', teacher), ('student', student))):
        ax = axes[row, 1 + 2 * j + k]
        ax.imshow(_scaled(m[row]), cmap='magma', vmin=0, vmax=1, interpolation='nearest')
        if row == 0:
          ax.set_title(f'{name} {who}\n{m.shape[1]}x{m.shape[2]}', fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  return fig


def teacher_student_agreement(maps: Mapping[str, tuple[np.ndarray, np.ndarray]]
                              ) -> dict[str, float]:
  """Per pair, the mean over photos of the Pearson correlation of student and teacher maps."""
  out = {}
  for name, (student, teacher) in maps.items():
    s = student.reshape(len(student), -1)
    t = teacher.reshape(len(teacher), -1)
    s = s - s.mean(1, keepdims=True)
    t = t - t.mean(1, keepdims=True)
    denom = np.sqrt((s * s).sum(1) * (t * t).sum(1))
    out[name] = float(np.mean(np.where(denom > 0, (s * t).sum(1) / np.maximum(denom, 1e-12),
                                       0.0)))
  return out


