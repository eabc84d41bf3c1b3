"""What the config-driven commands share: `--config.*` overrides and one-line errors."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable

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
  stopped on a non-finite loss (the last good checkpoint is kept).
  """
  from kdflax.config import ConfigError
  from kdflax.data.errors import CorruptImageError  # no TensorFlow import on this path
  from kdflax.train.loop import CheckpointRestoreError, CheckpointSaveError, NonFiniteLossError
  from kdflax.train.stages import StageError
  try:
    return fn()
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
