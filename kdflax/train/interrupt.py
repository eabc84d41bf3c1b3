"""SIGINT / SIGTERM -> a clean stop: finish the step, save, then one line and exit 130 / 143.

Two modes, both entered from the main thread only (elsewhere signals are left as they are):

- `handle_signals(command, resume)` (a command's whole run, `kdflax.commands.common`):
  a signal raises `Interrupted` where the main thread is, so a command stopped outside training
  (building data, exporting, evaluating) ends with one line, not a traceback.
- `stop_on_signal(hard_exit_line)` (the training loop, `kdflax.train.loop.fit`): a first
  signal only records itself; the loop asks `should_stop(step)` after every step, then saves a
  checkpoint, waits for its commit and raises `TrainingInterrupted`. A second signal exits at
  once (`os._exit`, after the line and the `on_hard_exit` callbacks, e.g. the workdir lock's
  release): the checkpoint being written is an uncommitted `STEP.orbax-checkpoint-tmp` folder
  that the next run removes, the committed ones are untouched.

With several processes every host must stop at the same step, the one they all checkpoint.
JAX's preemption service (`jax.distributed.initialize` starts it) catches SIGTERM in C++ and
agrees on a step through the coordinator (`multihost_utils.reached_preemption_sync_point`);
SIGTERM is left to it, and SIGINT is forwarded to it as a SIGTERM to this process. Without
that service, the hosts all-gather their flags after every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped a command outside a training step (nothing was saved).

  The command that catches it may fill in what its one line says: `command`, `resume` (the
  command line that continues), `top_workdir` (its `--workdir`), `detail` (what was left).
  """

  command = resume = top_workdir = detail = ''

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return EXIT_CODES.get(self.signum, 128 + self.signum)


class TrainingInterrupted(Interrupted):
  """A training stage stopped on a signal after committing a checkpoint of `step`."""

  def __init__(self, signum: int, step: int, total_steps: int, workdir: str,
               checkpoint: str, by_peer: bool = False):
    super().__init__(signum)
    self.step, self.total_steps, self.workdir = step, total_steps, workdir
    self.checkpoint, self.by_peer = checkpoint, by_peer
    self.args = (f'stopped by {signal_name(signum)} at step {step} of {total_steps}; '
                 f'checkpoint {checkpoint} committed',)


@dataclasses.dataclass
class _State:
  """What the handler needs: the mode, the first signal, and the command's context."""

  deferring: bool = False
  requested: int | None = None
  multihost: bool = False
  hard_exit_line: Callable[[int], str] | None = None
  on_hard_exit: list[Callable[[], None]] = dataclasses.field(default_factory=list)
  command: str = ''
  resume: str = ''


_state = _State()


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - the signal module's signature
  if not _state.deferring:
    raise Interrupted(signum)
  if _state.requested is None:
    _state.requested = signum
    with contextlib.suppress(Exception):  # on stdout: stderr gets the one closing line
      print(f'{signal_name(signum)}: the step under way finishes and is saved, then the run '
            'stops (a second signal stops it at once)', flush=True)
    if _state.multihost and signum != signal.SIGTERM and _sync_manager() is not None:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier (C++ handler)
    return
  hard_exit(signum)


def hard_exit(signum: int) -> None:
  """One line on stderr, the `on_hard_exit` callbacks, then `os._exit(130 or 143)`."""
  line = (_state.hard_exit_line(signum) if _state.hard_exit_line else
          f'second {signal_name(signum)}: stopped at once')
  try:
    os.write(2, f'{prefix()}{line}\n'.encode())
  finally:
    for callback in _state.on_hard_exit:
      with contextlib.suppress(Exception):
        callback()
    os._exit(EXIT_CODES.get(signum, 128 + signum))


def prefix() -> str:
  """`kdflax COMMAND: ` of the running command ('' outside one)."""
  return f'kdflax {_state.command}: ' if _state.command else ''


def resume_command() -> str:
  """The command line that resumes this run (the one that started it)."""
  return _state.resume or shlex.join(['kdflax', *sys.argv[1:]])


def _main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _installed(signums: tuple[int, ...]) -> Iterator[None]:
  previous = {s: signal.signal(s, _handler) for s in signums}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def handle_signals(command: str, resume: str) -> Iterator[None]:
  """A command's run: SIGINT / SIGTERM raise `Interrupted` (see the module docstring).

  Args:
    command: the command's name (`student`, `pipeline`), for `kdflax COMMAND: ` lines.
    resume: the command line that resumes the run ('': the process's own command line).
  """
  saved = (_state.command, _state.resume, _state.on_hard_exit)
  _state.command, _state.resume = command, resume
  _state.on_hard_exit = list(_state.on_hard_exit)
  try:
    if _main_thread():
      with _installed(SIGNALS):
        yield
    else:
      yield
  finally:
    _state.command, _state.resume, _state.on_hard_exit = saved


def on_hard_exit(callback: Callable[[], None]) -> None:
  """Runs `callback` before a hard exit (inside `handle_signals`: until it ends)."""
  _state.on_hard_exit.append(callback)


def _sync_manager():
  from jax._src import distributed  # the only place JAX keeps it
  return distributed.global_state.preemption_sync_manager


@contextlib.contextmanager
def stop_on_signal(hard_exit_line: Callable[[int], str]) -> Iterator[None]:
  """The training loop: a first signal is recorded for `should_stop`, a second one exits.

  `hard_exit_line(signum)` is the line printed on that exit (without `kdflax COMMAND: `).
  """
  import jax
  saved = (_state.deferring, _state.requested, _state.multihost, _state.hard_exit_line)
  multihost = jax.process_count() > 1
  # JAX's preemption notifier owns SIGTERM in a multi-host run (see the module docstring).
  signums = ((signal.SIGINT,) if multihost and _sync_manager() is not None else SIGNALS)
  _state.deferring, _state.requested, _state.multihost = True, None, multihost
  _state.hard_exit_line = hard_exit_line
  try:
    if _main_thread():
      with _installed(signums):
        yield
    else:
      yield
  finally:
    (_state.deferring, _state.requested, _state.multihost,
     _state.hard_exit_line) = saved


def requested() -> int | None:
  """The first signal received inside `stop_on_signal`, or None."""
  return _state.requested


def should_stop(step: int) -> tuple[int | None, bool]:
  """`(signal, by_peer)`: whether every process stops after `step` (same answer on all).

  `signal` is this process's own signal, or (`by_peer` True) SIGTERM when another process
  was signalled; None: go on.
  """
  if not _state.multihost:
    return _state.requested, False
  import numpy as np
  from jax.experimental import multihost_utils
  if _sync_manager() is not None:
    if not multihost_utils.reached_preemption_sync_point(step):
      return None, False
    stop = True
  else:
    flags = multihost_utils.process_allgather(np.int32(_state.requested or 0))
    stop = bool(np.max(flags))
  if not stop:
    return None, False
  if _state.requested is None:
    _state.requested = signal.SIGTERM  # a peer's signal, or JAX's notifier caught SIGTERM
    # SIGTERM reaches this process's own handler from now on: a second one exits at once.
    if _main_thread():
      signal.signal(signal.SIGTERM, _handler)
    return signal.SIGTERM, True
  if _main_thread():
    signal.signal(signal.SIGTERM, _handler)
  return _state.requested, False
