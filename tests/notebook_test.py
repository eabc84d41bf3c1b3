"""notebooks/colab_tpu.ipynb: a valid notebook whose every code cell runs (mock data, CPU).

The install cell (tag `install`) is checked against the pins instead of run; the parameter
cell (tag `parameters`) runs, then the test's values replace its own (names must exist there),
switching to mocked TFDS `plant_village` and the paper models shrunk in depth/width
(`helpers.paper_smoke`). Every other code cell runs in order in one namespace, as Jupyter
would, with the repository as working directory (where the install cell leaves Colab).
"""

import json
import pathlib
import re

import pytest
from helpers import paper_smoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'colab_tpu.ipynb'

pytestmark = pytest.mark.slow


def _load() -> dict:
  nb = json.loads(NOTEBOOK.read_text())
  assert nb['nbformat'] == 4 and nb['metadata']['kernelspec']['language'] == 'python'
  for cell in nb['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None  # committed clean
  return nb


def _source(cell) -> str:
  return ''.join(cell['source'])


def _tagged(nb, tag):
  (cell,) = [c for c in nb['cells'] if tag in c['metadata'].get('tags', [])]
  return cell


def _pins() -> dict[str, str]:
  lines = (ROOT / 'requirements' / 'constraints.txt').read_text().splitlines()
  return dict(line.split('==') for line in lines if '==' in line)


def test_install_cell_installs_the_pinned_set():
  src = _source(_tagged(_load(), 'install'))
  assert re.search(r'pip install .*-e \. -c requirements/constraints\.txt', src)
  jax_pins = re.findall(r'"jax\[(\w+)\]==([\d.]+)"', src)
  assert {extra for extra, _ in jax_pins} == {'tpu', 'cuda12'}
  assert {version for _, version in jax_pins} == {_pins()['jax']}
  project = (ROOT / 'pyproject.toml').read_text()
  low = re.search(r'"jax>=([\d.]+),<', project).group(1)
  assert _pins()['jax'] == low  # the notebook's JAX is the tested lower bound


def test_notebook_runs_every_cell_on_mock_data(tmp_path, monkeypatch, capsys):
  nb = _load()
  install, params = _tagged(nb, 'install'), _tagged(nb, 'parameters')
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  namespace: dict = {'__name__': '__notebook__'}
  exec(compile(_source(params), 'parameters', 'exec'), namespace)
  # fp32/fp16 exports are covered elsewhere; int8 is the one the notebook ships.
  flags = [*paper_smoke.SHRINK, "--config.export.precisions=('int8',)"]
  test_values = {'RUN': str(tmp_path / 'run'), 'FLAGS': flags,
                 'MOCK_DATA': True}
  assert set(test_values) <= set(namespace), 'the parameter cell lost a parameter'
  assert namespace['CONFIG'].endswith(':plantvillage_tomato_swin_l_mnv3')
  namespace.update(test_values)
  try:
    for i, cell in enumerate(nb['cells']):
      if cell['cell_type'] != 'code' or cell in (install, params):
        continue
      src = _source(cell)
      magics = [line for line in src.splitlines() if line.lstrip().startswith(('!', '%'))]
      assert not magics, f'cell {i}: shell/magic lines outside the install cell: {magics}'
      exec(compile(src, f'cell {i}', 'exec'), namespace)
  finally:
    if 'mock_data' in namespace:
      namespace['mock_data'].__exit__(None, None, None)
  run = tmp_path / 'run'
  out = capsys.readouterr().out
  # The results table has every stage and the int8 export; predict printed one JSON per photo.
  table = (run / 'results.md').read_text()
  for row in ('teacher', 'baseline student', 'distilled student', 'exported .tflite (int8)'):
    assert f'| {row} |' in table
  predictions = [json.loads(x) for x in out.splitlines() if x.startswith('{"file"')]
  assert len(predictions) == 4 and all(p['top_k'][0]['label'].startswith('Tomato___')
                                       for p in predictions)
  assert (run / 'figures' / 'learning_curves.png').stat().st_size > 0
  assert (run / 'figures' / 'attention.png').stat().st_size > 0
  assert list((run / 'export').glob('*_int8.tflite'))


def _statements(text: str) -> list[str]:
  """Python statements of a code block, each joined onto one whitespace-normalised line."""
  out, current = [], ''
  for line in text.splitlines():
    current = f'{current} {line.strip()}' if current else line.strip()
    if current and current.count('(') == current.count(')'):
      out.append(' '.join(current.split()))
      current = ''
  return out


def test_readme_colab_section_shows_the_notebooks_commands():
  readme = (ROOT / 'README.md').read_text()
  section = readme.split('## Colab TPU (or one GPU)', 1)[1].split('\n## ', 1)[0]
  assert 'notebooks/colab_tpu.ipynb' in section
  block = section.split('```python', 1)[1].split('```', 1)[0]
  notebook = {s for c in _load()['cells'] if c['cell_type'] == 'code'
              for s in _statements(_source(c))}
  shown = [s for s in _statements(block) if s.startswith(('!', '%', 'kdflax(', 'CONFIG', 'RUN'))]
  assert len(shown) >= 12
  missing = [s for s in shown if s not in notebook]
  assert not missing, f'README Colab lines not in the notebook: {missing}'
