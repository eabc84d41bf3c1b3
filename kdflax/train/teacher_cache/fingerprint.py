"""What a teacher cache was built from, and the first field where two such records differ.

    expected = expected_fingerprint(config, teacher_identity(info, digest), 64, 32, objective,
                                    records, labels, views=8)
    fingerprint_difference(manifest['fingerprint'], expected)   # None, or (field, have, want)

A cache is usable by a run when its manifest's `fingerprint` equals the run's: the teacher
(model, classes, overrides, a digest of its variables), both resolutions, the compute dtype,
the stored teacher targets, the train split (its files below the root, labels and sizes, not
where the root is), the seed, K and the augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from kdflax.train.teacher_cache.format import FORMAT

AUGMENTATION_KEYS = ('augment', 'crop_scale', 'crop_ratio', 'flip', 'randaugment_ops',
                     'randaugment_magnitude', 'eval_crop_fraction')
# Not the folder's path: `data.files_sha256` (paths below the root, labels, sizes) names the
# photos, so a cache stays valid when the data (or a clone of the repository) moves.
DATA_KEYS = ('source', 'name', 'data_dir', 'class_prefix', 'hash_split', 'hash_fractions',
             'train_split')


def variables_digest(variables: Mapping[str, Any]) -> str:
  """sha256 of every variable (path, dtype, shape, bytes), in sorted path order."""
  h = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(dict(variables), sep='/').items()):
    leaf = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(f'{path}|{leaf.dtype}|{leaf.shape}|'.encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def records_digest(records: Any) -> str:
  """sha256 of a split's file list: keys, labels and (for files) their sizes."""
  h = hashlib.sha256()
  h.update(json.dumps([str(k) for k in records.keys]).encode())
  h.update(np.asarray(records.labels, np.int64).tobytes())
  if records.paths is not None:
    h.update(json.dumps([os.path.getsize(p) if os.path.exists(p) else -1
                         for p in records.paths]).encode())
  return h.hexdigest()


def _plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def teacher_identity(info: Any, digest: str | None) -> dict[str, Any]:
  """The fingerprint's `teacher` entry: model, classes, overrides, variables digest."""
  return {'model': info.model, 'num_classes': int(info.num_classes),
          'overrides': _plain(info.overrides), 'variables_sha256': digest}


def target_specs(objective: Any) -> dict[str, dict[str, Any]]:
  """`'<term>/<pair>'` -> what its teacher target depends on (keys, kinds, distance, p, grid,
  shape); weights and normalisation are applied later and may change freely."""
  c = objective.config
  specs = {}
  for term, pairs in (('attention', objective.attention_pairs),
                      ('manifold', objective.manifold_pairs)):
    for pair in pairs:
      key = f'{term}/{pair.name}'
      spec = {'teacher': pair.teacher.key, 'teacher_kind': pair.teacher.kind,
              'student': pair.student.key, 'student_kind': pair.student.kind,
              'shape': list(objective.target_shapes[key])}
      if term == 'attention':
        spec['distance'] = pair.distance
        if pair.distance == 'map':
          spec['p'] = float(c['attention']['p'])
      else:
        spec['grid'] = c['manifold']['grid']
      specs[key] = spec
  return specs


def expected_fingerprint(config: ml_collections.ConfigDict, teacher: Mapping[str, Any],
                         teacher_size: int, student_size: int, objective: Any, records: Any,
                         labels: tuple[str, ...], views: int) -> dict[str, Any]:
  """What a cache for this run must have been built from.

  Args:
    config: the run config (data section, `train.compute_dtype`).
    teacher: `{'model', 'num_classes', 'overrides', 'variables_sha256'}` of the teacher.
    teacher_size, student_size: the resolutions the teacher and the student see.
    objective: the run's `Objective` (its pairs fix the stored targets).
    records: the train split's `Records`; labels: its class names.
    views: K.
  """
  data = config.data
  data_fields = {k: _plain(data[k]) for k in DATA_KEYS}
  data_fields.update(labels=list(labels), num_train=len(records),
                     files_sha256=records_digest(records))
  return {
      'format': FORMAT,
      'teacher': _plain(teacher),
      'teacher_image_size': int(teacher_size),
      'student_image_size': int(student_size),
      'compute_dtype': str(config.train.compute_dtype),
      'targets': target_specs(objective),
      'data': data_fields,
      'seed': int(config.seed),
      'views': int(views),
      'augmentation': {k: _plain(data[k]) for k in AUGMENTATION_KEYS},
  }


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value and key != 'targets':
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def fingerprint_difference(cached: Mapping[str, Any], expected: Mapping[str, Any]
                           ) -> tuple[str, Any, Any] | None:
  """`(field, cached value, expected value)` of the first difference, or None.

  The run's targets must each be in the cache with the same spec (a cache may hold more).
  """
  a, b = _flatten(cached), _flatten(expected)
  for key in b:
    if key == 'targets':
      have, want = a.get('targets', {}), b['targets']
      for name, spec in want.items():
        if have.get(name) != spec:
          return f'targets.{name}', have.get(name), spec
      continue
    if key not in a or a[key] != b[key]:
      return key, a.get(key), b[key]
  extra = [k for k in a if k not in b]
  if extra:
    return extra[0], a[extra[0]], None
  return None
