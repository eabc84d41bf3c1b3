"""Where kdflax keeps what it builds once per machine (compiled kernels, converted weights).

    cache_dir('kernels')     # $KDFLAX_CACHE_DIR/kernels, or ~/.cache/kdflax/kernels
"""

from __future__ import annotations

import os


def cache_dir(name: str) -> str:
  """`$KDFLAX_CACHE_DIR/<name>`, or `~/.cache/kdflax/<name>` when the variable is unset."""
  root = os.environ.get('KDFLAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'kdflax')
  return os.path.join(root, name)
