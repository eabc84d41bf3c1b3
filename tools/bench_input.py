"""Does the input pipeline keep up with the train step? Both measured in one run.

    .venv/bin/python tools/bench_input.py [--config configs/beans_hybrid.py] [--steps 10]
        [--batches 40] [--config.key=value ...]

Builds the distill stage of the config exactly as `kdflax distill` does (a freshly
initialised teacher of the configured architecture stands in for a trained one: the step's
speed does not depend on the weights), then measures
  1. the train stream: images/s delivered by `data.train()` (decode, shared crop,
     augmentation, resize to the student's and the teacher's resolutions), and
  2. the train step: images/s consumed by the jitted step (teacher forward + student
     forward/backward + update) on a batch already on the device,
and prints their ratio. The pipeline should deliver several times what the step consumes.
The two are timed one after the other, each with the machine to itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'beans_hybrid.py'))
  parser.add_argument('--steps', type=int, default=10, help='timed train steps')
  parser.add_argument('--batches', type=int, default=40, help='timed input batches')
  args, overrides = parser.parse_known_args(argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import jax

  from kdflax.config import load_config
  from kdflax.data.bench import measure_throughput
  from kdflax.train.loop import to_global
  from kdflax.train.stages import prepare_stage

  config = load_config(args.config, overrides)
  config.train.progress = False
  setup = prepare_stage(config, 'distill', random_teacher=True, log_fn=lambda _: None)

  pipeline = measure_throughput(setup.data.train(0), num_batches=args.batches, warmup=3)

  batch = to_global(next(setup.data.train(0)), setup.mesh)
  state, teacher = setup.state, setup.teacher_variables
  compile_start = time.perf_counter()
  state, metrics = setup.train_step(state, teacher, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - compile_start
  state, metrics = setup.train_step(state, teacher, batch)  # one untimed warm step
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = setup.train_step(state, teacher, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / args.steps
  batch_size = int(config.data.batch_size)
  step_ips = batch_size / step_s
  result = {
      'config': os.path.relpath(args.config, ROOT),
      'student': f'{setup.description.name}@{setup.description.image_size}',
      'teacher': f'{setup.teacher_model}@{setup.teacher_size}',
      'batch_size': batch_size, 'devices': setup.mesh.size,
      'pipeline_images_per_s': round(pipeline['images_per_s'], 1),
      'step_images_per_s': round(step_ips, 1), 'step_ms': round(1000 * step_s, 1),
      'step_compile_s': round(compile_s, 1),
      'ratio': round(pipeline['images_per_s'] / step_ips, 2),
      'machine': f'{os.cpu_count()} CPUs, {jax.devices()[0].platform}',
  }
  print(json.dumps(result, indent=2))
  print(f'input pipeline delivers {result["ratio"]:.2f}x the images/s the train step '
        f'consumes ({result["pipeline_images_per_s"]} vs {result["step_images_per_s"]} img/s)')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
