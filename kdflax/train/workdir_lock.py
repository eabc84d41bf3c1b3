"""One run per workdir: `WORKDIR/kdflax.lock` names the run that holds it.

    with workdir_lock('runs/x', 'kdflax student --config c.py --workdir runs/x'):
      ...   # train; a second run on runs/x is refused with WorkdirLockedError

The lock file is JSON: `host`, `pid`, `start` (local time), `command`, and what tells a live
holder from a dead one on the same host (`boot_id`, the process's start time in clock ticks
since boot, so a recycled pid is not taken for the holder). It is created with `O_EXCL` (atomic
on local disks and NFS) and removed when the run ends, also on an error or a signal.

- held by a live process on this host: `WorkdirLockedError` naming it;
- left by a dead process on this host (pid gone, or reused by another process, or a boot
  since): taken over, with one line on stderr saying so;
- held by another host (a workdir on Drive, NFS): refused, naming `--force_unlock` (this host
  cannot tell whether that run is alive), unless the lock has had no heartbeat for
  `STALE_AFTER_S` (the holder touches the file every `HEARTBEAT_S` from a thread of its own,
  also while it compiles or evaluates): then it is taken over with one line, as after a
  preempted Colab runtime, whose successor has another host name; `force=True` takes it;
- a workdir inside another run's locked workdir (a stage folder of a running pipeline) is
  refused the same way;
- a workdir on a read-only file system is not locked (nothing can be written to it anyway;
  the run fails at its first write with its own error, or reports a finished stage).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

LOCK_FILE = 'kdflax.lock'
# A lock file that is still empty or not JSON after this long is a crashed write.
UNREADABLE_GRACE_S = 30.0
HEARTBEAT_S = 30.0       # the holder touches its lock file this often
STALE_AFTER_S = 300.0    # another host's lock without a heartbeat for this long is taken over
_heartbeats: dict[str, threading.Event] = {}   # token -> stops that lock's heartbeat


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir (one line naming it and what to do)."""


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _process_start(pid: int) -> str:
  """Field 22 of `/proc/PID/stat` (start time in ticks since boot); '' where unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return ''


def _describe(holder: dict[str, Any]) -> str:
  return (f'pid {holder.get("pid")} on host {holder.get("host")} since {holder.get("start")} '
          f'({holder.get("command")})')


def _age(path: str) -> float:
  """Seconds since the last heartbeat of lock file `path` (its mtime)."""
  try:
    return time.time() - os.path.getmtime(path)
  except OSError:
    return 0.0


def _holder_state(holder: dict[str, Any], path: str) -> str:
  """'live', 'dead' (same host, gone; another host, no heartbeat) or 'elsewhere'."""
  if holder.get('host') != socket.gethostname():
    return 'dead' if _age(path) > STALE_AFTER_S else 'elsewhere'
  if holder.get('boot_id') and holder['boot_id'] != _boot_id():
    return 'dead'
  pid = int(holder.get('pid', -1))
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return 'dead'
  except (PermissionError, OverflowError, ValueError):
    pass  # another user's process: alive
  started = _process_start(pid)
  if holder.get('process_start') and started and started != holder['process_start']:
    return 'dead'  # the pid was reused
  return 'live' if pid > 0 else 'dead'


def read_lock(path: str) -> dict[str, Any] | None:
  """The holder recorded in lock file `path`; None if there is none; `{}` if unreadable."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _refusal(path: str, holder: dict[str, Any], state: str, inside: str = '') -> str:
  where = (f'{os.path.dirname(path)}: in use by another run' if not inside else
           f'{inside}: inside {os.path.dirname(path)}, in use by another run')
  if state == 'live':
    return (f'{where}: {_describe(holder)}; wait for it to end or stop it (Ctrl-C saves a '
            'checkpoint and exits), or use another --workdir')
  return (f'{where}: {_describe(holder)}, another host, which this one cannot check (last '
          f'heartbeat {_age(path):.0f} s ago; taken over after {STALE_AFTER_S:.0f} s without '
          'one); if that run is gone (a recycled Colab runtime, a lost machine), re-run with '
          '--force_unlock')


def _check_ancestors(workdir: str, force: bool) -> None:
  """Refuses a workdir inside a live locked workdir (e.g. a running pipeline's stage)."""
  parent = os.path.dirname(workdir)
  while not force and parent and parent != os.path.dirname(parent):
    holder = read_lock(os.path.join(parent, LOCK_FILE))
    if holder:
      state = _holder_state(holder, os.path.join(parent, LOCK_FILE))
      if state != 'dead':
        raise WorkdirLockedError(_refusal(os.path.join(parent, LOCK_FILE), holder, state,
                                          inside=workdir))
    parent = os.path.dirname(parent)


def _create(path: str, record: dict[str, Any]) -> bool:
  """Writes `record` to a new `path`; False if `path` exists."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump(record, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  return True


def acquire(workdir: str, command: str, force: bool = False,
            note: Callable[[str], None] | None = None) -> dict[str, Any] | None:
  """Takes the lock of `workdir` (created if needed) for this process.

  Args:
    workdir: the run's directory.
    command: the command line recorded as the holder's.
    force: take the lock whoever holds it (`--force_unlock`).
    note: where the one line about a taken-over lock goes (default stderr).

  Returns:
    The lock record (give it to `release`), or None on a read-only file system.

  Raises:
    WorkdirLockedError: another run holds `workdir` (or a workdir above it).
    OSError: `workdir` cannot be made (a file, no permission).
  """
  note = note or (lambda line: print(line, file=sys.stderr, flush=True))
  workdir = os.path.abspath(workdir)
  _check_ancestors(workdir, force)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  record = {'host': socket.gethostname(), 'pid': os.getpid(),
            'start': time.strftime('%Y-%m-%d %H:%M:%S %Z'), 'command': command,
            'boot_id': _boot_id(), 'process_start': _process_start(os.getpid()),
            'token': uuid.uuid4().hex}
  for _ in range(5):
    try:
      if _create(path, record):
        _start_heartbeat(path, record['token'])
        return record
    except OSError as e:
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
      raise
    holder = read_lock(path)
    if holder is None:
      continue  # released in between: try again
    if holder == {}:
      age = time.time() - os.path.getmtime(path)
      if age < UNREADABLE_GRACE_S and not force:
        raise WorkdirLockedError(f'{workdir}: another run is taking its lock right now '
                                 f'({path} is being written); try again in a minute')
      why = 'an unreadable lock file'
    else:
      state = _holder_state(holder, path)
      if state != 'dead' and not force:
        raise WorkdirLockedError(_refusal(path, holder, state))
      gone = (', no longer running' if holder.get('host') == socket.gethostname() else
              f', no heartbeat for {_age(path) / 60:.0f} min')
      why = f'the lock of {_describe(holder)}' + (gone if state == 'dead' else ' (--force_unlock)')
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    note(f'{workdir}: took over {why}')
  raise WorkdirLockedError(f'{workdir}: could not take {path} (other runs keep taking it)')


def _start_heartbeat(path: str, token: str) -> None:
  """Touches `path` every HEARTBEAT_S until `release` (a daemon thread: it dies with us)."""
  stop = _heartbeats[token] = threading.Event()

  def beat() -> None:
    while not stop.wait(HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(path)

  threading.Thread(target=beat, name='kdflax-lock-heartbeat', daemon=True).start()


def release(workdir: str, record: dict[str, Any] | None) -> None:
  """Removes the lock of `workdir` if `record` (from `acquire`) still holds it."""
  if record is None:
    return
  stop = _heartbeats.pop(record['token'], None)
  if stop is not None:
    stop.set()
  path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
  holder = read_lock(path)
  if holder and holder.get('token') == record['token']:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def workdir_lock(workdir: str, command: str, force: bool = False,
                 note: Callable[[str], None] | None = None) -> Iterator[dict[str, Any] | None]:
  """`acquire` ... `release` around a run (see `acquire` for the arguments and errors)."""
  record = acquire(workdir, command, force, note)
  try:
    yield record
  finally:
    release(workdir, record)
