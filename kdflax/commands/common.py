"""What the config-driven commands share: `--config.*` overrides, one-line errors, and for the
commands that train (teacher, student, distill, pipeline, matrix) the workdir lock and the
clean stop on SIGINT / SIGTERM (`training_run`)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator

import ml_collections

from kdflax import atomic


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Parses `argv` (without the command name); everything else must be `--config.*`."""
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith(('--config.', '-config.'))]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)}')
  return args, rest


def add_force_unlock(parser: argparse.ArgumentParser) -> None:
  """`--force_unlock`: take the workdir's lock whoever holds it (`training_run`)."""
  parser.add_argument('--force_unlock', action='store_true',
                      help='take over the workdir from the run that holds its lock (only when '
                           'that run is gone, e.g. on another host or a recycled Colab runtime)')


@contextlib.contextmanager
def training_run(argv: list[str], workdir: str,
                 config: ml_collections.ConfigDict | None = None,
                 force_unlock: bool = False) -> Iterator[None]:
  """The run of a command that trains in `workdir`: its lock, and a clean stop on a signal.

  `argv` starts with the command name; without `--force_unlock` it is the command that
  resumes the run. The lock (`kdflax.train.workdir_lock`) is taken by process 0 only of a
  multi-host run (`config.distributed`); SIGINT / SIGTERM raise `Interrupted` outside training
  steps and stop training cleanly inside them (`kdflax.train.interrupt`); both end in
  `run_reporting_errors` as one line and exit 130 / 143.
  """
  from kdflax.train import interrupt, workdir_lock
  command = argv[0]
  resume = shlex.join(['kdflax', *[a for a in argv if a != '--force_unlock']])
  dist = config.distributed if config is not None else None
  takes_lock = dist is None or int(dist.num_processes) <= 1 or int(dist.process_id) == 0
  with interrupt.handle_signals(command, resume):
    record = (workdir_lock.acquire(workdir, resume, force_unlock,
                                   lambda line: print(f'kdflax {command}: {line}',
                                                      file=sys.stderr, flush=True))
              if takes_lock else None)
    interrupt.on_hard_exit(lambda: workdir_lock.release(workdir, record))
    try:
      yield
    except interrupt.Interrupted as e:  # the context its one line needs, once this ends
      e.command, e.resume, e.top_workdir = command, resume, os.path.abspath(workdir)
      raise
    finally:
      workdir_lock.release(workdir, record)


def interrupted_line(error: KeyboardInterrupt) -> str:
  """The one line of a run stopped by a signal (`Interrupted`, `TrainingInterrupted`, or a
  plain KeyboardInterrupt: SIGINT where no handler was installed)."""
  from kdflax.train import interrupt
  name = interrupt.signal_name(getattr(error, 'signum', signal.SIGINT))
  resume = getattr(error, 'resume', '') or shlex.join(['kdflax', *sys.argv[1:]])
  if getattr(error, 'detail', ''):
    return f'stopped by {name}; {error.detail}'
  if not isinstance(error, interrupt.TrainingInterrupted):
    return (f'stopped by {name} outside a training step (nothing to save; what was '
            f'committed is kept); to continue: {resume}')
  top = getattr(error, 'top_workdir', '')
  stage = os.path.relpath(error.workdir, top) if top else error.workdir
  stage = error.workdir if stage.startswith('..') else stage
  stage = getattr(error, 'command', '') if stage == '.' else stage
  why = ('with the other processes on a preemption notice (SIGTERM)' if error.by_peer else
         f'by {name}')
  return (f'stopped {why} at step {error.step} of {error.total_steps} (stage {stage}); '
          f'checkpoint {error.checkpoint} committed; resume with: {resume}')


def run_with_config(argv: list[str],
                    parse_args: Callable[[list[str]], tuple[argparse.Namespace, list[str]]],
                    body: Callable[[str, argparse.Namespace, ml_collections.ConfigDict], int]
                    ) -> int:
  """A command's `main`: flags, then `body(command, args, config)` with errors reported.

  `argv` starts with the command name; `parse_args(argv)` returns the flags and the
  `--config.*` overrides; `args.config` is loaded with those overrides (inside the error
  reporting, so a bad config is one line and exit code 2) and handed to `body`, whose return
  value is the exit code (`run_reporting_errors`).
  """
  command = argv[0]
  args, overrides = parse_args(argv)

  def run() -> int:
    from kdflax.config import load_config
    return body(command, args, load_config(args.config, overrides))

  return run_reporting_errors(command, run)


def run_reporting_errors(command: str, fn: Callable[[], int]) -> int:
  """Runs `fn`; user-facing failures become one line on stderr and an exit code.

  2: a bad config, data, teacher or path (nothing was trained), a corrupt image with
  `on_corrupt='error'`, or a file-system error (a workdir that is a file, no permission, disk
  full: `PATH: cause`; in an asynchronous checkpoint save: which step is kept); 3: training
  stopped on a non-finite loss (the last good checkpoint is kept); 4: the workdir is locked by
  another run; 130 / 143: stopped by SIGINT / SIGTERM (`interrupted_line`).
  """
  from kdflax.config import ConfigError
  from kdflax.data.errors import CorruptImageError  # no TensorFlow import on this path
  from kdflax.train.interrupt import Interrupted
  from kdflax.train.loop import CheckpointRestoreError, CheckpointSaveError, NonFiniteLossError
  from kdflax.train.stages import StageError
  from kdflax.train.workdir_lock import WorkdirLockedError
  try:
    return fn()
  except KeyboardInterrupt as e:  # `Interrupted` too
    code = e.exit_code if isinstance(e, Interrupted) else 130
    line = interrupted_line(e)
  except WorkdirLockedError as e:
    code, line = 4, str(e)
  except (ConfigError, StageError, FileNotFoundError, ValueError, CorruptImageError,
          CheckpointSaveError, CheckpointRestoreError) as e:
    code, line = 2, str(e)
  except OSError as e:
    code, line = 2, atomic.os_error_line(e)
  except NonFiniteLossError as e:
    code, line = 3, str(e)
  # The failed run's objects (tf.data iterators among them) sit in reference cycles through
  # the traceback; collect them now, while Python is alive, not at interpreter exit (where
  # tf.data logs a FAILED_PRECONDITION warning for each generator).
  gc.collect()
  print(f'kdflax {command}: {line}', file=sys.stderr)
  return code
