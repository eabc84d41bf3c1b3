"""Teacher-output cache: the frozen teacher run once over K fixed augmented views per image.

    from kdflax.train.teacher_cache.build import build_cache
    manifest = build_cache(config, 'runs/cache', teacher_dir='runs/teacher/model_best', views=8)
    cache = TeacherCache('runs/cache')          # one-line CacheError if absent or incomplete
    cache.check(expected)                       # one-line CacheError naming a differing field
    outputs = cache.lookup(index, view)         # {'teacher_logits': (b, K), ...}

View v of train record i is the train transform (random-resized crop, flip, RandAugment) with
the seed pair `kdflax.data.plan.view_seeds(seed, i, v)`: a pure function of (seed, i, v). The
build feeds it to the teacher at the teacher's resolution; a train stream made with
`make_datasets(..., cache_views=K)` shows record i in epoch e its view
`epoch_views(seed, e, N, K)[i]`, the same crop at the student's resolution, and yields
`index` and `view` with the batch, so the host gathers the matching teacher outputs.

Stored per (record, view): the teacher's logits and, per attention/manifold pair of the
objective, `Objective.teacher_targets` (the teacher's map, features or tokens already aligned
to the student's grid): the loss from the cache equals the loss with the live teacher on the
same view. Layout of DIR:

    manifest.json                      written last: its presence marks a complete cache
    logits.00000.npy ...               (n, K, classes) float32, n <= shard_images records each
    attention.<pair>.00000.npy ...     (n, K, *target_shape) float32
    manifold.<pair>.00000.npy ...

A build writes into `DIR.partial-<pid>` and renames it to DIR at the end; a killed build
leaves no DIR (a rerun removes the leftover and starts again). Shards are memory-mapped on
read. The manifest's `fingerprint` (see `expected_fingerprint`) must equal the run's; mixup /
CutMix cannot be cached (a mixed image's teacher output depends on its partner).

Modules: `format` (file names, `FORMAT`, `PARTIAL`, `LOGITS`, `CacheError`), `fingerprint`
(what a cache was built from), `reader` (`TeacherCache` and the cached train stream), `build`
(`build_cache`: import it from `kdflax.train.teacher_cache.build`; it builds on the stages,
which read caches through this package, so the package does not import it).
"""

from kdflax.train.teacher_cache.fingerprint import (
    AUGMENTATION_KEYS,
    DATA_KEYS,
    expected_fingerprint,
    fingerprint_difference,
    records_digest,
    target_specs,
    teacher_identity,
    variables_digest,
)
from kdflax.train.teacher_cache.format import MANIFEST, SHARD_BYTES, CacheError, refuse_mixing
from kdflax.train.teacher_cache.reader import CachedTeacherData, CachedTeacherStream, TeacherCache

__all__ = [
    'AUGMENTATION_KEYS', 'DATA_KEYS', 'MANIFEST', 'SHARD_BYTES', 'CacheError', 'CachedTeacherData',
    'CachedTeacherStream', 'TeacherCache',
    'expected_fingerprint', 'fingerprint_difference', 'records_digest', 'refuse_mixing',
    'target_specs', 'teacher_identity', 'variables_digest',
]
