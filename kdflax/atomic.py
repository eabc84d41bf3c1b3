"""Atomic writes: a file or directory appears complete at its path, or not at all.

    write_bytes('out/m.tflite', data)          # temp file in the same folder + rename
    write_json('run/results.json', {...})
    with staged_file('out/m.tflite') as tmp:   # write and check `tmp`; renamed on success,
      ...                                      # removed if the block raises
    replace_dir(tmp_dir, 'run/model_best')     # swap a finished directory into place

Temp names start with '.' and live beside the target (same filesystem, so the rename is
atomic); a crash leaves at most a hidden temp, never a half-written target. Used by every
writer in kdflax (configs, metrics summaries, model directories, caches, .tflite, reports,
figures). Imports nothing from kdflax. `os_error_line` is the one-line form of a failed
file-system operation that every command prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any


def _default_mode(path: str) -> None:
  """mkstemp creates 0600 files; give the result the usual umask-based mode."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def remove_file(path: str | os.PathLike) -> None:
  """Removes `path` if it exists."""
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temp path beside `path`; renamed to `path` when the block ends normally.

  The folder of `path` is created. If the block raises, the temp file is removed and `path`
  is left as it was.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                             dir=folder)
  os.close(fd)
  try:
    yield tmp
    _default_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    remove_file(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with staged_file(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
  """Writes `obj` as JSON (and a final newline) to `path` atomically."""
  write_text(path, json.dumps(obj, indent=indent) + '\n')


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
  """Moves the finished directory `tmp` to `final`, replacing what was there.

  The old directory is first renamed aside, so `final` is at every moment either the old or
  the new complete directory (absent only between two renames); the old one is then deleted.
  """
  tmp, final = os.fspath(tmp), os.fspath(final)
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix='.' + os.path.basename(final) + '.old-',
                           dir=os.path.dirname(os.path.abspath(final)))
    os.rmdir(old)
    os.rename(final, old)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def os_error_line(e: OSError) -> str:
  """`PATH: cause` for a file-system error (e.g. `runs/x/config.json: Not a directory`)."""
  where = e.filename if e.filename is not None else ''
  cause = e.strerror or str(e)
  return f'{where}: {cause}' if where else cause
