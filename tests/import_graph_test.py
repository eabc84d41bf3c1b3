"""Data flows one way: no kdflax package imports a package above it (function-level imports
included), so a lower layer can be read, tested and replaced without the ones above."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'kdflax'
# Lowest first: a package may import only packages of a lower or equal rank.
LAYERS = {
    'atomic': 0,
    'data': 1,
    'models': 2,
    'convert': 3, 'distill': 3,
    'config': 4,
    'train': 5,
    'export': 6,
    'plots': 7,
    'pipeline': 8,
    'commands': 9,
    'cli': 10,
}


def _package(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).parts[0].removesuffix('.py')


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """`(line, kdflax package)` of every `import kdflax.x` / `from kdflax[.x] import y`."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = ([f'{node.module}.{a.name}' for a in node.names] if node.module == 'kdflax'
               else [node.module])
    for name in names:
      parts = name.split('.')
      if parts[0] == 'kdflax' and len(parts) > 1:
        out.append((node.lineno, parts[1]))
  return out


def test_every_package_is_placed_in_a_layer():
  packages = {_package(p) for p in ROOT.rglob('*.py')} - {'__init__'}
  assert packages == set(LAYERS)


def test_no_package_imports_a_layer_above_it():
  upward = []
  for path in sorted(ROOT.rglob('*.py')):
    if path.name == '__init__.py' and path.parent == ROOT:
      continue
    here = _package(path)
    for line, target in _imports(path):
      if LAYERS[target] > LAYERS[here]:
        upward.append(f'{path.relative_to(ROOT.parent)}:{line}: {here} imports {target}')
  assert not upward, '\n'.join(upward)


def test_the_checker_sees_function_level_imports(tmp_path):
  source = tmp_path / 'm.py'
  source.write_text('def f():\n  from kdflax.train import stages\n  import kdflax.export.tflite\n'
                    'from kdflax import atomic\n')
  assert sorted(_imports(source)) == [(2, 'train'), (3, 'export'), (4, 'atomic')]
