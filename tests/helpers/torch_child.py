"""Runs a PyTorch/timm helper script in a CPU-only child process (torch stays out of JAX's)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_torch_child(script: str, args: list[str], what: str, stdin: str | None = None,
                    timeout: float = 900) -> str:
  """`python script args...` with CUDA hidden; returns stdout, raises with stderr's tail."""
  env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
  proc = subprocess.run([sys.executable, script, *args], input=stdin, capture_output=True,
                        text=True, env=env, timeout=timeout)
  if proc.returncode != 0:
    raise RuntimeError(f'{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc.stdout
