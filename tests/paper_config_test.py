"""The paper's configuration end to end on mocked TFDS `plant_village`: teacher -> distil ->
int8 export with standard metadata -> predict, real model families shrunk in depth/width."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import paper_smoke
from PIL import Image

from kdflax import cli
from kdflax.config import load_config
from kdflax.data.photos import split_photos
from kdflax.data.pipeline import source_from_config
from kdflax.export.model_metadata import read_standard_metadata
from kdflax.train.checkpoint import read_model_info

pytestmark = pytest.mark.slow


def test_paper_config_teacher_distill_export_predict(tmp_path, capsys):
  flags = list(paper_smoke.SHRINK)
  config = load_config(paper_smoke.CONFIG, flags)
  teacher_dir, distill_dir = tmp_path / 'teacher', tmp_path / 'distill'
  out = tmp_path / 'export' / 'student.tflite'
  with tfds.testing.mock_data(num_examples=paper_smoke.MOCK_EXAMPLES):
    labels = tfds.builder('plant_village').info.features['label'].names
    tomato = tuple(n for n in labels if n.startswith('Tomato___'))
    assert cli.main(['teacher', '--config', paper_smoke.CONFIG, '--workdir', str(teacher_dir),
                     *flags]) == 0
    assert cli.main(['distill', '--config', paper_smoke.CONFIG, '--workdir', str(distill_dir),
                     '--teacher_workdir', str(teacher_dir), *flags]) == 0
    assert cli.main(['export', '--checkpoint', str(distill_dir), '--out', str(out),
                     '--precision', 'int8', '--config', paper_smoke.CONFIG, *flags,
                     '--allow-mismatch', '--no-report']) == 0
    photos, _, _ = split_photos(source_from_config(config.data), 'validation', 224, limit=2)
    figures = tmp_path / 'figures'
    assert cli.main(['figures', '--config', paper_smoke.CONFIG, '--run', str(tmp_path),
                     '--out', str(figures), '--num_images', '2', *flags]) == 0
  teacher = read_model_info(teacher_dir / 'model_best')
  student = read_model_info(distill_dir / 'model_best')
  assert (teacher.model, teacher.image_size) == ('swin_large_patch4_window12_384', 384)
  assert (student.model, student.image_size) == ('mobilenetv3_large_100', 224)
  assert teacher.labels == student.labels == tomato and len(tomato) == 10
  # The distil stage ran the hybrid objective with every Swin-L -> MobileNetV3-L stage pair.
  logged = [json.loads(x) for x in (distill_dir / 'metrics.jsonl').read_text().splitlines()]
  keys = set().union(*logged)
  for i in range(4):
    assert any(f'stage{i}' in k for k in keys), sorted(keys)
  assert any('kd' in k for k in keys)
  # The int8 file carries standard metadata with the tomato labels packed inside.
  meta = read_standard_metadata(out.read_bytes(), str(out))
  assert meta is not None and meta.labels == tomato
  files = []
  for i, image in enumerate(photos):
    files.append(tmp_path / f'leaf{i}.png')
    Image.fromarray(image).save(files[-1])
  capsys.readouterr()
  assert cli.main(['predict', '--model', str(out), *map(str, files), '--no-progress']) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [pathlib.Path(x['file']).name for x in lines] == [f.name for f in files]
  for line in lines:
    scores = [c['score'] for c in line['top_k']]
    assert line['top_k'][0]['label'] in tomato and np.all(np.diff(scores) <= 0)
  # Figures: learning curves of both stages, the 4 Swin-L -> MobileNetV3-L stage maps.
  curves = np.asarray(Image.open(figures / 'learning_curves.png'))
  grid = np.asarray(Image.open(figures / 'attention.png'))
  assert curves.ndim == 3 and grid.shape[1] > grid.shape[0]  # 2 rows x 9 columns
  agreement = json.loads((figures / 'attention.json').read_text())
  assert agreement['photos'] == 2
  assert sorted(agreement['map_correlation']) == [f'stage{i}' for i in range(4)]
  assert all(-1 <= v <= 1 for v in agreement['map_correlation'].values())
