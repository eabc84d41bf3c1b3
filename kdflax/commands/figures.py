"""`kdflax figures`: learning curves and teacher-vs-student attention pictures of a run.

    kdflax figures --config configs/beans_hybrid.py --run runs/beans
        # -> runs/beans/figures/learning_curves.png, attention.png, attention.json

`--run` is a pipeline-style run folder with `teacher/`, `student/` and `distill/` workdirs
(those present are drawn). The attention picture needs the teacher (`RUN/teacher`, or
`config.teacher.checkpoint`), the distilled student (`RUN/distill`) and attention pairs in
`config.loss.attention.pairs`; it shows `--num_images` photos of the eval split.
`attention.json` holds the mean teacher/student map correlation per pair.
"""

from __future__ import annotations

import argparse
import os

from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.train.config import load_config

RUNS = (('teacher', 'teacher'), ('student', 'baseline student'), ('distill', 'distilled student'))


def make_figures(config, run: str, out: str, num_images: int = 4, log=print) -> list[str]:
  """Writes the run's figures into `out`; returns the paths written."""
  from kdflax import atomic
  from kdflax.plots.learning_curves import learning_curves, save_figure
  from kdflax.train.checkpoint import resolve_model_dir

  written = []
  runs = {name: os.path.join(run, d) for d, name in RUNS if os.path.isdir(os.path.join(run, d))}
  if not runs:
    raise FileNotFoundError(f'{run}: no teacher/, student/ or distill/ workdir in it')
  written.append(save_figure(learning_curves(runs, title=os.path.basename(run.rstrip('/'))),
                             os.path.join(out, 'learning_curves.png')))
  if not config.loss.attention.pairs:
    log('attention: skipped (config.loss.attention.pairs is empty)')
    return written
  from kdflax.plots.attention_grid import (
    attention_grid,
    attention_pictures,
    teacher_student_agreement,
  )
  teacher = resolve_model_dir(config.teacher.checkpoint or os.path.join(run, 'teacher'))
  student = resolve_model_dir(os.path.join(run, 'distill'))
  photos, maps, captions = attention_pictures(config, teacher, student, num_images)
  written.append(save_figure(attention_grid(photos, maps, captions),
                             os.path.join(out, 'attention.png')))
  path = os.path.join(out, 'attention.json')
  atomic.write_json(path, {'teacher': teacher, 'student': student, 'photos': len(photos),
                           'map_correlation': teacher_student_agreement(maps)})
  written.append(path)
  return written


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='kdflax figures', description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='the run\'s config (data, loss pairs)')
  parser.add_argument('--run', required=True, help='folder with teacher/ student/ distill/')
  parser.add_argument('--out', default=None, help='output folder (default: RUN/figures)')
  parser.add_argument('--num_images', type=int, default=4, help='photos in the attention grid')
  args, rest = parse_with_overrides(parser, argv[1:])

  def run() -> int:
    config = load_config(args.config, rest)
    for path in make_figures(config, args.run, args.out or os.path.join(args.run, 'figures'),
                             args.num_images):
      print(path)
    return 0

  return run_reporting_errors('figures', run)
