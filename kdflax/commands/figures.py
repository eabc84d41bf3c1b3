"""`kdflax figures`: learning curves and teacher-vs-student attention pictures of a run.

    kdflax figures --config configs/beans_hybrid.py --run runs/beans
        # -> runs/beans/figures/learning_curves.png, attention.png, attention.json

`--run` is a pipeline-style run folder with `teacher/`, `student/` and `distill/` workdirs
(those present are drawn); `--teacher_workdir`, `--baseline_workdir` and `--distill_workdir`
name them one by one instead (e.g. rows of a `kdflax matrix`:
`--teacher_workdir M/teacher --baseline_workdir M/baseline_s0 --distill_workdir M/kd_s0`).
The attention picture needs the teacher (`RUN/teacher`, or `config.teacher.checkpoint`), the
distilled student (`RUN/distill`) and attention pairs in `config.loss.attention.pairs`; it
shows `--num_images` photos of the eval split. `attention.json` holds the mean
teacher/student map correlation per pair.
"""

from __future__ import annotations

import argparse
import os
import sys

from kdflax.commands.common import parse_with_overrides, run_reporting_errors
from kdflax.config import load_config

RUNS = (('teacher', 'teacher'), ('student', 'baseline student'), ('distill', 'distilled student'))


def make_figures(config, workdirs: dict[str, str], out: str, num_images: int = 4,
                 title: str = '', log=print) -> list[str]:
  """Writes the figures of `workdirs` (stage -> workdir: teacher, student, distill) into `out`;
  returns the paths written."""
  from kdflax import atomic
  from kdflax.plots.learning_curves import learning_curves, save_figure
  from kdflax.train.checkpoint import resolve_model_dir

  written = []
  runs = {name: workdirs[d] for d, name in RUNS if d in workdirs and os.path.isdir(workdirs[d])}
  if not runs:
    raise FileNotFoundError(f'no teacher, student or distill workdir among {workdirs}')
  written.append(save_figure(learning_curves(runs, title=title),
                             os.path.join(out, 'learning_curves.png')))
  if not config.loss.attention.pairs:
    log('attention: skipped (config.loss.attention.pairs is empty)')
    return written
  from kdflax.plots.attention_grid import (
    attention_grid,
    attention_pictures,
    teacher_student_agreement,
  )
  if 'distill' not in workdirs or not (config.teacher.checkpoint or 'teacher' in workdirs):
    log('attention: skipped (needs the teacher and the distilled student)')
    return written
  teacher = resolve_model_dir(config.teacher.checkpoint or workdirs['teacher'])
  student = resolve_model_dir(workdirs['distill'])
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
  parser.add_argument('--run', help='folder with teacher/ student/ distill/ workdirs')
  parser.add_argument('--teacher_workdir', help='the teacher\'s workdir (default RUN/teacher)')
  parser.add_argument('--baseline_workdir', help='the baseline student\'s (RUN/student)')
  parser.add_argument('--distill_workdir', help='the distilled student\'s (RUN/distill)')
  parser.add_argument('--out', default=None, help='output folder (default: RUN/figures)')
  parser.add_argument('--title', default=None, help='title of the curves (default: RUN name)')
  parser.add_argument('--num_images', type=int, default=4, help='photos in the attention grid')
  args, rest = parse_with_overrides(parser, argv[1:])

  given = {'teacher': args.teacher_workdir, 'student': args.baseline_workdir,
           'distill': args.distill_workdir}
  if not args.run and not (args.out and any(given.values())):
    print('kdflax figures: give --run RUN, or the workdirs and --out', file=sys.stderr)
    return 2

  def run() -> int:
    config = load_config(args.config, rest)
    workdirs = {stage: given[stage] or (os.path.join(args.run, stage) if args.run else None)
                for stage in given}
    out = args.out or os.path.join(args.run, 'figures')
    title = args.title if args.title is not None else os.path.basename(
        (args.run or '').rstrip('/'))
    for path in make_figures(config, {k: v for k, v in workdirs.items() if v}, out,
                             args.num_images, title):
      print(path)
    return 0

  return run_reporting_errors('figures', run)
