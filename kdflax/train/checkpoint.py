"""Self-describing model checkpoints: Flax variables (Orbax) + `model.json`.

A model directory is what `kdflax convert` writes, what the trainer exports as its best/final
model, and what `distill --teacher`, `export` and `predict` read:

    DIR/model.json     {"model": name, "num_classes": K, "image_size": S, "labels": [...],
                        "overrides": {...}}
    DIR/variables/     Orbax checkpoint of {'params': ..., ['batch_stats': ...]}

Writes are atomic: everything goes into a sibling temp directory that is renamed into place,
so a crash never leaves a half-written model at DIR.

The training loop's own checkpoints (the whole `TrainState`, `WORKDIR/checkpoints/STEP`) are
Orbax `CheckpointManager` steps: `checkpoint_manager`, `restore_latest`, `committed_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdflax import atomic
from kdflax.models import registry

MODEL_JSON = 'model.json'
# The model directories a training run leaves in its workdir.
BEST_MODEL_DIR = 'model_best'
FINAL_MODEL_DIR = 'model_final'
VARIABLES_DIR = 'variables'
CHECKPOINT_DIR = 'checkpoints'  # the training loop's Orbax checkpoints, in a workdir


class CheckpointRestoreError(RuntimeError):
  """The checkpoint to resume from cannot be read; nothing was changed."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a model directory says about its model."""

  model: str
  num_classes: int
  image_size: int
  labels: tuple[str, ...] = ()
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def create(self, **extra_overrides: Any):
    """`(module, image_size)` for this model, via `create_model`."""
    module, _ = registry.create_model(self.model, self.num_classes,
                                      **{**dict(self.overrides), **extra_overrides})
    return module, self.image_size


def _remove_dir(path: str, attempts: int = 20) -> None:
  """Removes `path`, again if a write still in flight (TensorStore's C++ threads outlive a
  failed save) recreates part of it."""
  for _ in range(attempts):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      return
    time.sleep(0.05)


def _remove_leftover_temps(directory: str) -> None:
  """Removes `DIRECTORY.tmp-*` folders a failed or killed earlier save of `directory` left."""
  parent, prefix = os.path.dirname(directory), os.path.basename(directory) + '.tmp-'
  for name in os.listdir(parent):
    if name.startswith(prefix):
      _remove_dir(os.path.join(parent, name))


def save_model(directory: str | os.PathLike, variables: Mapping[str, Any], model: str,
               num_classes: int, image_size: int, labels: Sequence[str] = (),
               overrides: Mapping[str, Any] | None = None) -> str:
  """Writes `variables` and their description to `directory` atomically.

  Args:
    directory: destination; replaced if it exists.
    variables: `{'params': ..., ['batch_stats': ...]}` of arrays (host or device).
    model: registered model name.
    num_classes: head size.
    image_size: square input resolution the model was trained at.
    labels: class names in label order (empty when unknown).
    overrides: `create_model` overrides needed to rebuild the module (JSON-serialisable).

  Returns:
    The absolute directory path.
  """
  directory = os.path.abspath(os.fspath(directory))
  if labels and len(labels) != num_classes:
    raise ValueError(f'{directory}: {len(labels)} labels for {num_classes} classes')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  host = _host_arrays(directory, variables)
  _remove_leftover_temps(directory)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + '.tmp-', dir=parent)
  # Model directories are written by one process (the caller decides which): host NumPy
  # arrays, no cross-process barrier.
  solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
  checkpointer = ocp.StandardCheckpointer(multiprocessing_options=solo)
  try:
    checkpointer.save(os.path.join(tmp, VARIABLES_DIR), host)
    checkpointer.wait_until_finished()
    info = {'model': model, 'num_classes': int(num_classes), 'image_size': int(image_size),
            'labels': list(labels), 'overrides': dict(overrides or {})}
    with open(os.path.join(tmp, MODEL_JSON), 'w') as f:
      json.dump(info, f, indent=2)
    atomic.replace_dir(tmp, directory)
  except BaseException:
    # Orbax writes from a background thread: let it stop before the temp dir goes, or it
    # could recreate files in it after the removal.
    try:
      checkpointer.close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
      pass
    _remove_dir(tmp)
    raise
  checkpointer.close()
  return directory


def _host_arrays(directory: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """Copies `variables` to host NumPy; a non-numeric leaf is a one-line error naming its key."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(variables))
  for path, leaf in jax.tree_util.tree_leaves_with_path(host):
    if leaf.dtype.kind not in 'biufc' and leaf.dtype.name != 'bfloat16':
      raise TypeError(f'{directory}: variable {jax.tree_util.keystr(path)} is '
                      f'{type(leaf).__name__} of dtype {leaf.dtype}, expected a numeric array')
  return host


def read_model_info(directory: str | os.PathLike) -> ModelInfo:
  """Parses `directory/model.json`; a one-line error if it is absent or malformed."""
  path = os.path.join(os.fspath(directory), MODEL_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: not a kdflax model directory (no {MODEL_JSON})')
  try:
    with open(path) as f:
      raw = json.load(f)
    info = ModelInfo(model=raw['model'], num_classes=int(raw['num_classes']),
                     image_size=int(raw['image_size']), labels=tuple(raw.get('labels', ())),
                     overrides=dict(raw.get('overrides', {})))
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{path}: malformed model description ({type(e).__name__}: {e})') from None
  registry.model_spec(info.model)  # unknown names fail here, with the list of known ones
  return info


def load_model(directory: str | os.PathLike) -> tuple[ModelInfo, dict[str, Any]]:
  """Reads a model directory: `(info, variables)` with NumPy leaves."""
  info = read_model_info(directory)
  path = os.path.abspath(os.path.join(os.fspath(directory), VARIABLES_DIR))
  solo = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})
  variables = ocp.StandardCheckpointer(multiprocessing_options=solo).restore(path)
  return info, jax.tree.map(np.asarray, variables)


def resolve_model_dir(path: str | os.PathLike | None) -> str | None:
  """A model directory as it is; a training workdir -> its `model_best/`; None -> None.

  Raises:
    FileNotFoundError: `path` is neither (one line naming it).
  """
  if not path:
    return None
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, MODEL_JSON)):
    return path
  best = os.path.join(path, BEST_MODEL_DIR)
  if os.path.isfile(os.path.join(best, MODEL_JSON)):
    return best
  raise FileNotFoundError(f'{path}: neither a model directory ({MODEL_JSON} + {VARIABLES_DIR}/) '
                          f'nor a training workdir with {BEST_MODEL_DIR}/ (train it first)')


def committed_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints under `workdir/checkpoints` whose save completed (Orbax writes
  `STEP.orbax-checkpoint-tmp` and renames it to `STEP` when the save commits)."""
  folder = os.path.join(workdir, CHECKPOINT_DIR)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(name) for name in names if name.isdigit())


def root_cause(error: BaseException) -> str:
  """The innermost `__cause__` of `error` on one line (TensorStore's own error says what is
  wrong; Orbax wraps it). A TensorStore error that carries an OS error code is reduced to that
  error (`No space left on device`), not its page-long store spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  if isinstance(error, OSError) and error.strerror:
    return atomic.os_error_line(error)
  text = ' '.join(str(error).split())
  os_code = re.search(r"\[os_error_code='(\d+)'\]", text)
  if os_code:
    return os.strerror(int(os_code.group(1)))
  return text[:240] or type(error).__name__


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The Orbax manager of `workdir/checkpoints`, keeping the newest `keep` checkpoints."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The latest saved state, or `state` itself when there is none.

  Raises:
    CheckpointRestoreError: the latest checkpoint cannot be read (truncated, corrupt, or from
      another model); one line naming its folder and what to do.
  """
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many types
    folder = os.path.join(str(manager.directory), str(step))
    cause = root_cause(e)
    raise CheckpointRestoreError(
        f'{folder}: the checkpoint cannot be read ({cause}); move that folder away to resume '
        'from the one before it, or use a new --workdir to start over') from None
