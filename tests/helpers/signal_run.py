"""Runs the `kdflax` CLI with a pause at one training step, for a test to signal it there.

    python tests/helpers/signal_run.py STEP MARKER [--hang-commit] -- student --config ...

Once step STEP is trained the loop writes the file MARKER and waits (at most a minute) until a
signal has reached it or the file `MARKER.go` exists: the test sends SIGINT / SIGTERM
knowing which step the run is at (a tiny step takes milliseconds, too fast to aim at).
With `--hang-commit`, the save of checkpoint STEP stops just before its commit (Orbax's
rename of `STEP.orbax-checkpoint-tmp` to `STEP`): it writes `MARKER.saving` and sleeps, so a
second signal arrives while the first one's checkpoint is being saved.

The hooks wrap `kdflax.train.loop._check_saves` (called once per step, after the step) and
`orbax.checkpoint._src.path.async_path.rename`; nothing else changes.
"""

import asyncio
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


def install(step: int, marker: str, hang_commit: bool) -> None:
  from kdflax.train import interrupt, loop  # pylint: disable=import-outside-toplevel
  check_saves = loop._check_saves  # pylint: disable=protected-access

  def pause(run, at):
    check_saves(run, at)
    if at != step:
      return
    pathlib.Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + 60
    while (interrupt.requested() is None and not os.path.exists(marker + '.go')
           and time.time() < deadline):
      time.sleep(0.01)

  loop._check_saves = pause  # pylint: disable=protected-access
  if not hang_commit:
    return
  from orbax.checkpoint._src.path import async_path  # pylint: disable=import-outside-toplevel
  rename = async_path.rename

  async def rename_hook(src, dst):
    if pathlib.Path(str(dst)).name == str(step):
      pathlib.Path(marker + '.saving').write_text('saving')
      await asyncio.sleep(120)
    return await rename(src, dst)

  async_path.rename = rename_hook


def main(argv: list[str]) -> int:
  hang = '--hang-commit' in argv
  argv = [a for a in argv if a != '--hang-commit']
  if len(argv) < 3 or not argv[0].isdigit() or argv[2] != '--':
    raise SystemExit('usage: signal_run.py STEP MARKER [--hang-commit] -- KDFLAX_ARGS...')
  sys.path.insert(0, str(ROOT))
  install(int(argv[0]), argv[1], hang)
  from kdflax import cli  # pylint: disable=import-outside-toplevel
  sys.argv = ['kdflax', *argv[3:]]
  return cli.main()  # as the entry point, like the `kdflax` script


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
