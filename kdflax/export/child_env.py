"""The environment of kdflax's helper child processes (`python -m kdflax.export.<module>`).

    subprocess.run([sys.executable, '-m', 'kdflax.export.isolated', ...], env=child_env())

The caller's environment, TensorFlow's C++ logging off unless set, and this checkout's
package root first on PYTHONPATH, so the child imports the same kdflax as the parent.
Imports nothing from kdflax: the interpreter runner (`isolated`) and the metadata writer
(`model_metadata`) both start children with it without importing each other.
"""

from __future__ import annotations

import os


def child_env() -> dict[str, str]:
  """`os.environ` -> a copy for a kdflax child process (see the module docstring)."""
  env = dict(os.environ)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env['PYTHONPATH'] = os.pathsep.join(p for p in (package_root, env.get('PYTHONPATH')) if p)
  return env
