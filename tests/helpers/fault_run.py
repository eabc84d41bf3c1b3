"""Runs the `kdflax` CLI with one fault injected into Orbax's checkpoint save.

    python tests/helpers/fault_run.py MODE STEP -- student --config ... --workdir ...

MODE says what happens to the save of checkpoint STEP (other steps save normally):

- `kill-at-start`: SIGKILL right after Orbax made `STEP.orbax-checkpoint-tmp`, before any
  array is written;
- `kill-before-commit`: SIGKILL after every array and metadata file is written, just before
  Orbax renames the temporary folder to `STEP` (the commit);
- `enospc`: the commit fails with `OSError(ENOSPC)`, as a disk that fills up does (the
  stand-in where a size-limited tmpfs cannot be mounted).

The hooks replace functions of `orbax.checkpoint._src.path.async_path`, which Orbax's atomic
save (`atomicity.AtomicRenameTemporaryPath`) looks up at call time.
"""

import errno
import os
import pathlib
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODES = ('kill-at-start', 'kill-before-commit', 'enospc')


def _is_step(path, step: int, temporary: bool) -> bool:
  name = pathlib.Path(str(path)).name
  return name.startswith(f'{step}.orbax-checkpoint-tmp') if temporary else name == str(step)


def install(mode: str, step: int) -> None:
  """Patches Orbax's async path helpers so that the save of `step` meets `mode`."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=import-outside-toplevel
  mkdir, rename = async_path.mkdir, async_path.rename

  async def mkdir_hook(path, *args, **kwargs):
    result = await mkdir(path, *args, **kwargs)
    if mode == 'kill-at-start' and _is_step(path, step, temporary=True):
      os.kill(os.getpid(), signal.SIGKILL)
    return result

  async def rename_hook(src, dst):
    if _is_step(dst, step, temporary=False):
      if mode == 'kill-before-commit':
        os.kill(os.getpid(), signal.SIGKILL)
      if mode == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return await rename(src, dst)

  async_path.mkdir, async_path.rename = mkdir_hook, rename_hook


def main(argv: list[str]) -> int:
  if len(argv) < 3 or argv[0] not in MODES or not argv[1].isdigit() or argv[2] != '--':
    raise SystemExit(f'usage: fault_run.py {{{",".join(MODES)}}} STEP -- KDFLAX_ARGS...')
  sys.path.insert(0, str(ROOT))
  install(argv[0], int(argv[1]))
  from kdflax import cli  # pylint: disable=import-outside-toplevel
  sys.argv = ['kdflax', *argv[3:]]
  return cli.main()  # as the entry point, like the `kdflax` script


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
