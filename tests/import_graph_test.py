"""Data flows one way: no kdflax package imports a package above it (function-level imports
included), so a lower layer can be read, tested and replaced without the ones above; and no
two kdflax modules import each other, directly or through others (no import circle)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'kdflax'
# Lowest first: a package may import only packages of a lower or equal rank.
LAYERS = {
    'atomic': 0, 'cache_dir': 0,
    'data': 1,
    'models': 2,
    'convert': 3, 'distill': 3,
    'config': 4,
    'train': 5,
    'export': 6,
    'app': 7, 'plots': 7,
    'pipeline': 8,
    'commands': 9,
    'cli': 10,
}


def _package(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).parts[0].removesuffix('.py')


def _imported_names(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
  """`(line, dotted name)` of every kdflax import in `path`, function-level ones included.

  `from kdflax.a import b` gives `kdflax.a.b` (a module or a name in `kdflax.a`); relative
  imports are resolved against the module's package.
  """
  module = _module_name(path, root)
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      out += [(node.lineno, f'{base}.{a.name}') for a in node.names]
  return [(line, name) for line, name in out if name.split('.')[0] == 'kdflax']


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """`(line, kdflax package)` of every `import kdflax.x` / `from kdflax[.x] import y`."""
  return [(line, name.split('.')[1]) for line, name in _imported_names(path)
          if len(name.split('.')) > 1]


def _module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
  """`root/train/stages.py` -> 'kdflax.train.stages' (a file outside `root`: its stem)."""
  if not path.is_relative_to(root):
    return path.stem
  parts = path.relative_to(root.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  """`{module: modules it imports}` over the `.py` files under `root` (a package folder).

  An import of `a.b.c` is an edge to the module `a.b.c` (or, when `c` is a name, to `a.b`)
  and to each package on the way that does not also contain the importer: importing
  `kdflax.train.teacher_cache.reader` from `kdflax.train.stages` runs
  `kdflax/train/teacher_cache/__init__.py` first, and whatever that imports.
  """
  files = {_module_name(p, root): p for p in root.rglob('*.py')}
  graph = {}
  for module, path in files.items():
    own = {'.'.join(module.split('.')[:i]) for i in range(1, module.count('.') + 2)}
    if path.name != '__init__.py':
      own.discard(module)
    edges = set()
    for _, name in _imported_names(path, root):
      parts = name.split('.')
      for i in range(2, len(parts) + 1):
        prefix = '.'.join(parts[:i])
        if prefix in files and prefix not in own:
          edges.add(prefix)
    graph[module] = edges - {module}
  return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected groups of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  circles = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        circles.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return circles


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


def test_no_import_circle_between_modules():
  circles = import_circles(import_graph())
  assert not circles, 'import circles:\n' + '\n'.join(' <-> '.join(c) for c in circles)


def test_the_checker_sees_function_level_imports(tmp_path):
  source = tmp_path / 'm.py'
  source.write_text('def f():\n  from kdflax.train import stages\n  import kdflax.export.tflite\n'
                    'from kdflax import atomic\n')
  assert sorted(_imports(source)) == [(2, 'train'), (3, 'export'), (4, 'atomic')]


def test_the_checker_finds_circles_through_functions_and_packages(tmp_path):
  """a -> b (module level) -> c (in a function) -> a; and d -> pkg.x whose package's
  `__init__` imports e, which imports d: two circles. A package's `__init__` importing its
  own modules is not one."""
  root = tmp_path / 'kdflax'
  (root / 'pkg').mkdir(parents=True)
  files = {
      '__init__.py': '', 'a.py': 'from kdflax import b\n',
      'b.py': 'def f():\n  from kdflax.c import g\n', 'c.py': 'import kdflax.a\ndef g(): pass\n',
      'd.py': 'from kdflax.pkg.x import y\n', 'e.py': 'def f():\n  from kdflax import d\n',
      'pkg/__init__.py': 'from kdflax.pkg.x import y\nfrom kdflax import e\n',
      'pkg/x.py': 'from kdflax.pkg import z\ny = 1\n', 'pkg/z.py': '',
  }
  for name, text in files.items():
    (root / name).write_text(text)
  assert import_circles(import_graph(root)) == [
      ['kdflax.a', 'kdflax.b', 'kdflax.c'], ['kdflax.d', 'kdflax.e', 'kdflax.pkg']]
