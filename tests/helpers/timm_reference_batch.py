"""Several `timm_reference` runs (and timm parameter counts) in ONE subprocess.

Each PyTorch reference process spends ~5 s of CPU importing torch/timm/transformers; a test
module that needs several references pays that once with this helper. Every run goes
through `timm_reference`'s own entry point, so the saved files and `Reference` fields are
exactly those of `timm_reference(...)`.

    refs, counts = shared_timm_references(tmp_path_factory, {
        'tiny': dict(model='swin_tiny_patch4_window7_224', num_classes=10, image_size=224,
                     hooks=['layers.0'], batch=1),
        'hf': dict(model='hf_swin', num_classes=10, image_size=64, hf_swin=True,
                   kwargs={'embed_dim': 32, 'depths': [1, 2], 'num_heads': [1, 2]}),
    }, param_counts={'swin_t': ('swin_tiny_patch4_window7_224', {})})
    refs['tiny'].logits      # as timm_reference(tmp_path, 'swin_tiny_...', 10, 224, ...)
    counts['swin_t']         # parameters of the timm model at 1000 classes, built on 'meta'

Under pytest-xdist a module's tests may run in several workers, each setting up the module's
fixtures; `shared_timm_references` computes once per session (keyed by its arguments) and
lets the other workers wait for and read the same files. `timm_references(tmp_path, ...)`
is the plain, uncached version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

if not __package__:  # run as the reference subprocess: make `helpers` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from helpers import timm_reference as single  # noqa: E402


def _argv(out: pathlib.Path, spec: Mapping[str, Any]) -> list[str]:
  argv = ['--model', spec['model'], '--num_classes', str(spec['num_classes']),
          '--image_size', str(spec['image_size']), '--out', str(out),
          '--batch', str(spec.get('batch', 2)), '--seed', str(spec.get('seed', 0)),
          '--kwargs', json.dumps(spec.get('kwargs') or {}), '--hooks', *spec.get('hooks', ())]
  return (argv + (['--hf_swin'] if spec.get('hf_swin') else [])
          + (['--calibrate_bn'] if spec.get('calibrate_bn') else []))


def _load(out: pathlib.Path, hooks) -> single.Reference:
  data = np.load(out / 'reference.npz')
  with open(out / 'meta.json') as f:
    meta = json.load(f)
  return single.Reference(
      checkpoint=out / 'model.safetensors', pth_checkpoint=out / 'model.pth',
      image=data['image'], logits=data['logits'],
      hooks={h: data[f'hook:{h}'] for h in hooks}, num_params=meta['num_params'])


def timm_references(tmp_path: pathlib.Path, specs: Mapping[str, Mapping[str, Any]],
                    param_counts: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
                    ) -> tuple[dict[str, single.Reference], dict[str, int]]:
  """Runs every `{label: timm_reference keyword arguments}` spec in one process.

  Args:
    tmp_path: folder for the checkpoints and outputs.
    specs: per label, `model`, `num_classes`, `image_size` and optionally `hooks`, `kwargs`,
      `batch`, `seed`, `hf_swin`, `calibrate_bn` (as `timm_reference` takes them).
    param_counts: `{label: (timm name, create_model kwargs)}` counted at 1000 classes on
      PyTorch's `meta` device (nothing allocated).

  Returns:
    `({label: Reference}, {label: parameter count})`.
  """
  root = pathlib.Path(tmp_path) / 'timm_references'
  root.mkdir(parents=True, exist_ok=True)
  _run(root, specs, param_counts)
  return _load_all(root, specs)


def shared_timm_references(tmp_path_factory, specs: Mapping[str, Mapping[str, Any]],
                           param_counts: Mapping[str, tuple[str, Mapping[str, Any]]] | None
                           = None) -> tuple[dict[str, single.Reference], dict[str, int]]:
  """`timm_references` computed once per pytest session, even across xdist workers."""
  base = pathlib.Path(tmp_path_factory.getbasetemp())
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # the session's folder, shared by its workers
  digest = hashlib.sha1(json.dumps([specs, param_counts], sort_keys=True, default=list)
                        .encode()).hexdigest()[:12]
  root = base / f'timm_references_{digest}'
  root.mkdir(parents=True, exist_ok=True)
  with open(root / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker computes, the others wait
    if not (root / 'done').exists():
      _run(root, specs, param_counts)
      (root / 'done').touch()
  return _load_all(root, specs)


def _run(root: pathlib.Path, specs: Mapping[str, Mapping[str, Any]],
         param_counts: Mapping[str, tuple[str, Mapping[str, Any]]] | None) -> None:
  job = {'runs': {label: _argv(root / label, spec) for label, spec in specs.items()},
         'param_counts': {k: [name, dict(kw)] for k, (name, kw) in (param_counts or {}).items()},
         'counts_file': str(root / 'param_counts.json')}
  from helpers.torch_child import run_torch_child
  run_torch_child(__file__, [], 'timm references', stdin=json.dumps(job))


def _load_all(root: pathlib.Path, specs: Mapping[str, Mapping[str, Any]]
              ) -> tuple[dict[str, single.Reference], dict[str, int]]:
  refs = {label: _load(root / label, spec.get('hooks', ())) for label, spec in specs.items()}
  with open(root / 'param_counts.json') as f:
    counts = json.load(f)
  return refs, counts


def _main() -> None:
  job = json.loads(sys.stdin.read())
  for argv in job['runs'].values():
    pathlib.Path(argv[argv.index('--out') + 1]).mkdir(parents=True, exist_ok=True)
    sys.argv = [single.__file__, *argv]
    single._main()  # noqa: SLF001 - the single-reference entry point, run in-process.
  counts = {}
  if job['param_counts']:
    import timm
    import torch
    for label, (name, kwargs) in job['param_counts'].items():
      with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
      counts[label] = sum(p.numel() for p in model.parameters())
  with open(job['counts_file'], 'w') as f:
    json.dump(counts, f)


if __name__ == '__main__':
  _main()
