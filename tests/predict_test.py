"""`kdflax predict` on folders of real leaf photos, with a `.tflite` and with a model directory."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers.export_models import TinyCNN, init_calibrated, leaf_files, leaf_images

from kdflax.commands import predict
from kdflax.export import tflite
from kdflax.export.images import load_image

SIZE = 32
LABELS = ('angular_leaf_spot', 'bean_rust', 'healthy')


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  module = TinyCNN(num_classes=3)
  variables = init_calibrated(module, SIZE, leaf_images(SIZE, 'train', per_class=4))
  path = tmp_path_factory.mktemp('model') / 'leaf.tflite'
  tflite.export_tflite(module, variables, SIZE, path, 'fp32', labels=LABELS)
  return path, module, variables


@pytest.fixture
def photo_dir(tmp_path):
  """6 real photos in nested folders, a truncated JPEG and a text file."""
  root = tmp_path / 'photos'
  for i, f in enumerate(leaf_files('val', per_class=2)):
    dest = root / ('nested' if i % 2 else '') / f.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(f, dest)
  good = leaf_files('val', per_class=3)[-1].read_bytes()
  (root / 'nested' / 'broken.jpg').write_bytes(good[:len(good) // 3])  # truncated JPEG
  (root / 'notes.txt').write_text('not an image')
  return root


def _lines(text):
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_folder_with_a_corrupt_jpeg(model, photo_dir, capsys):
  path, module, variables = model
  code = predict.main(['predict', '--model', str(path), str(photo_dir), '--top_k', '2'])
  out, err = capsys.readouterr()
  lines = _lines(out)
  assert code == 1  # something failed
  assert len(lines) == 7  # one line per image file, the text file is not an image
  bad = [x for x in lines if 'error' in x]
  assert [x['file'] for x in bad] == [str(photo_dir / 'nested' / 'broken.jpg')]
  assert 'broken.jpg' in err and 'cannot decode' in bad[0]['error']
  good = [x for x in lines if 'error' not in x]
  images = np.stack([load_image(x['file'], SIZE) for x in good])
  logits = np.asarray(module.apply(variables, images.astype(np.float32) / 255.0))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for line, p in zip(good, probs, strict=True):
    assert line['label'] == LABELS[int(p.argmax())] == line['top_k'][0]['label']
    assert line['score'] == pytest.approx(p.max(), abs=1e-5)
    assert len(line['top_k']) == 2 and line['top_k'][0]['score'] >= line['top_k'][1]['score']
    assert line['top_k'][1]['label'] == LABELS[int(np.argsort(-p)[1])]


def test_all_good_is_exit_0_and_order_is_stable(model, photo_dir, capsys):
  (photo_dir / 'nested' / 'broken.jpg').unlink()
  path = str(model[0])
  assert predict.main(['predict', '--model', path, str(photo_dir), '--no-progress']) == 0
  first = _lines(capsys.readouterr().out)
  # A folder is walked top-down, each level's files sorted before its sub-folders.
  files = (sorted(str(p) for p in photo_dir.glob('*.jpg'))
           + sorted(str(p) for p in (photo_dir / 'nested').glob('*.jpg')))
  assert [x['file'] for x in first] == files and len(files) == 6
  # Files named directly come first, in the order given; the results do not depend on threads.
  assert predict.main(['predict', '--model', path, files[-1], str(photo_dir), '--threads', '1',
                       '--no-progress']) == 0
  second = _lines(capsys.readouterr().out)
  assert second[0] == first[-1] and second[1:] == first


def test_bad_usage_is_exit_2(model, tmp_path, capsys):
  path = str(model[0])
  assert predict.main(['predict', '--model', path, str(tmp_path / 'missing')]) == 2
  assert 'missing: no such file' in capsys.readouterr().err
  assert predict.main(['predict', '--model', str(tmp_path / 'nope.tflite'), str(tmp_path)]) == 2
  (tmp_path / 'empty').mkdir()
  assert predict.main(['predict', '--model', path, str(tmp_path / 'empty')]) == 2
  assert 'no images' in capsys.readouterr().err
  assert predict.main(['predict', '--model', path]) == 2  # argparse: PATH is required
  not_a_model = tmp_path / 'x.tflite'
  not_a_model.write_bytes(b'garbage!')
  assert predict.main(['predict', '--model', str(not_a_model), str(tmp_path)]) == 2


def test_model_directory_runs_in_jax(tmp_path, photo_dir, capsys):
  from kdflax.models import create_model
  from kdflax.train.checkpoint import save_model
  module, _ = create_model('mobilenetv3_small_050', num_classes=3)
  variables = module.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  directory = save_model(tmp_path / 'model', variables, 'mobilenetv3_small_050', 3, SIZE,
                         labels=LABELS)
  code = predict.main(['predict', '--model', directory, str(photo_dir), '--no-progress'])
  lines = _lines(capsys.readouterr().out)
  assert code == 1 and len(lines) == 7
  good = [x for x in lines if 'error' not in x]
  images = np.stack([load_image(x['file'], SIZE) for x in good])
  want = np.asarray(module.apply(variables, images.astype(np.float32) / 255.0)).argmax(-1)
  assert [x['label'] for x in good] == [LABELS[i] for i in want]
