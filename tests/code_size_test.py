"""Every kdflax module stays readable: files under ~400 lines, functions under ~80."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'kdflax'
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules():
  return sorted(ROOT.rglob('*.py'))


def test_no_module_is_over_the_file_limit():
  long = [f'{p.relative_to(ROOT.parent)}: {n} lines' for p in _modules()
          if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
  assert not long, '\n'.join(long)


def test_no_function_is_over_the_function_limit():
  long = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
          long.append(f'{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {lines} lines')
  assert not long, '\n'.join(long)
