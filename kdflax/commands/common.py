"""What the config-driven commands share: `--config.*` overrides and one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def parse_with_overrides(parser: argparse.ArgumentParser,
                         argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Parses `argv` (without the command name); everything else must be `--config.*`."""
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith(('--config.', '-config.'))]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)}')
  return args, rest


def run_reporting_errors(command: str, fn: Callable[[], int]) -> int:
  """Runs `fn`; user-facing failures become one line on stderr and an exit code.

  2: a bad config, data, teacher or path (nothing was trained), a corrupt image with
  `on_corrupt='error'`, or a file-system error (a workdir that is a file, no permission, disk
  full: `PATH: cause`); 3: training stopped on a non-finite loss (the last good checkpoint is
  kept).
  """
  from kdflax.config import ConfigError
  from kdflax.data.errors import CorruptImageError  # no TensorFlow import on this path
  from kdflax.train.loop import NonFiniteLossError
  from kdflax.train.stages import StageError
  try:
    return fn()
  except (ConfigError, StageError, FileNotFoundError, ValueError, CorruptImageError) as e:
    print(f'kdflax {command}: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    print(f'kdflax {command}: {os_error_line(e)}', file=sys.stderr)
    return 2
  except NonFiniteLossError as e:
    print(f'kdflax {command}: {e}', file=sys.stderr)
    return 3


def os_error_line(e: OSError) -> str:
  """`PATH: cause` for a file-system error (e.g. `runs/x/config.json: Not a directory`)."""
  where = e.filename if e.filename is not None else ''
  cause = e.strerror or str(e)
  return f'{where}: {cause}' if where else cause
