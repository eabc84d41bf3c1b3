"""`kdflax` command-line entry point.

    kdflax <command> [flags]    e.g. kdflax distill --config configs/quickstart.py --workdir x

Each command lives in `kdflax/commands/<command>.py` and exposes `main(argv) -> int`; it is
imported only when called, so `kdflax --help` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

COMMANDS = {
    'teacher': ('train', 'fine-tune the teacher on the configured data'),
    'student': ('train', 'train the baseline student (no teacher)'),
    'distill': ('train', 'distil a teacher into the student'),
    'cache-teacher': ('cache_teacher', 'run the frozen teacher once over K augmented views of '
                      'the train images (distill --config.teacher.cache)'),
    'eval': ('evaluate', 'evaluate a model directory or workdir on a split'),
    'pipeline': ('pipeline', 'teacher -> baseline -> distil -> export -> report'),
    'matrix': ('matrix', 'every distillation method x seed, exported to int8, mean +- std'),
    'figures': ('figures', 'learning curves and teacher-vs-student attention pictures of a run'),
    'export': ('export', 'export a model to .tflite (fp32 / fp16 / int8) with a parity check'),
    'predict': ('predict', 'classify images with a .tflite file or a model directory'),
    'app': ('app', 'a static web app (phone, offline) that runs a .tflite with MediaPipe'),
    'convert': ('convert', 'convert a timm / Hugging Face PyTorch checkpoint to a model dir'),
    'info': ('info', 'params, GMACs and sown intermediates of registered models'),
    'demo': ('demo', 'forward every preset on bundled leaf photos and print a table'),
}
# Commands whose work imports TensorFlow (tf.data input, the TFLite converter).
USES_TENSORFLOW = ('teacher', 'student', 'distill', 'cache-teacher', 'eval', 'pipeline', 'matrix',
                   'export')


def quiet_background_errors() -> None:
  """Keeps library noise off stderr so a failure reads as the command's one line.

  Orbax's save threads log failures through absl and leave "Event loop is closed" tracebacks
  in their worker threads, a failed restore leaves asyncio tasks that log their errors, and
  TensorBoard's writer reports a failed flush at exit: the
  command's own one-line error already names the path and the cause. `KDFLAX_VERBOSE=1`
  keeps all of it.
  """
  import logging
  import threading
  import warnings
  logging.getLogger('absl').setLevel(logging.CRITICAL)
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)  # Orbax's abandoned read tasks
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited')
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None


def _import_quietly(module: str) -> types.ModuleType:
  """Imports `module` with file descriptor 2 pointed at /dev/null for the duration.

  TensorFlow (>= 2.20) writes its oneDNN notice to stderr before absl logging is set up,
  whatever `TF_CPP_MIN_LOG_LEVEL` says; a command module imports it. An import that fails is
  retried with stderr back, so its error is still shown.
  """
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    return importlib.import_module(module)
  except Exception:  # pylint: disable=broad-except
    pass
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return importlib.import_module(module)


def _usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ['usage: kdflax <command> [flags]   (kdflax <command> --help for its flags)', '',
           'commands:']
  lines += [f'  {name:<{width}}  {text}' for name, (_, text) in COMMANDS.items()]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  """Dispatches `argv[0]` to its command module; returns the process exit code.

  Called as the process's entry point (`argv` None: the `kdflax` script, `python -m
  kdflax.cli`), background-thread noise and TensorFlow's import notices are kept off stderr
  (`quiet_background_errors`, `_import_quietly`); called
  from Python with an `argv` (a notebook cell), the caller's process is left as it is.
  """
  own_process = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(_usage())
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f'kdflax: unknown command {command!r}\n\n{_usage()}', file=sys.stderr)
    return 2
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  name = f'kdflax.commands.{COMMANDS[command][0]}'
  if own_process and os.environ.get('KDFLAX_VERBOSE', '') in ('', '0'):
    quiet_background_errors()
    if command in USES_TENSORFLOW:
      _import_quietly('tensorflow')
    module = _import_quietly(name)
  else:
    module = importlib.import_module(name)
  return int(module.main([command, *rest]) or 0)


if __name__ == '__main__':
  sys.exit(main())
