"""Schedules: which rows of a split's `Records` table each step reads. Pure NumPy, no TF.

Train. Epoch `e` visits the N records in the order `epoch_permutation(seed, e, N)` (a seeded
shuffle of the whole table, a new one per epoch). Step `s` is step `s % S` of epoch `s // S`,
`S = N // B` steps per epoch for a global batch of B (the last `N % B` records of each
epoch's order are dropped, different ones every epoch). Row r of the global batch takes
position `p = (s % S) * B + r` of that order. So a batch is a pure function of (seed, step):
an iterator started at step s yields what an uninterrupted one yields from step s on, and only
the rows of the batches it yields are ever read.

- Process i of P reads the global rows `[i * B/P, (i + 1) * B/P)`: the union of the P
  process-local batches is the global batch.
- Augmentation randomness is keyed by the slot `e * N + p` (unique in the stream), as the seed
  pair `(seed, slot)`, so it does not depend on the process count either.
- Corrupt images: each row carries `1 + retries` candidate records, the records at positions
  p, p+1, ... (mod N) of the epoch's order; the pipeline uses the first that decodes. The
  stream thus stays a pure function of (seed, step) whatever images are corrupt.
- Cached teacher views (`views=K > 0`, for training from a teacher-output cache): every record
  has K fixed augmented views; view v of record i is augmented with the seed pair
  `view_seeds(seed, i, v) = (seed, -(1 + i * MAX_VIEWS + v))` (negative: never a slot seed), a
  pure function of (seed, record, view). Epoch e shows record i its view
  `epoch_views(seed, e, N, K)[i]`: each record goes through its K views in a seeded order, a
  new order every K epochs, so K consecutive epochs show every view once. Each row carries
  its candidates' views and seeds, so the batch can name (record, view) for the cache lookup.
  Mixing images cannot be cached: views and mixup/CutMix exclude each other.
- Mixup / CutMix pair global rows (2j, 2j+1): each row mixes with its partner with the pair's
  lambda and box, drawn from `(seed, step)` for the whole global batch, so the mixing also does
  not depend on the process count (a process batch must hold whole pairs: B/P even).

Eval. Every record once, in table order, in `ceil(N / B)` global batches; the last one is
filled with index -1 (padding), and process i reads rows `[i * B/P, (i + 1) * B/P)`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Domain separation of the NumPy seed sequences.
_PERMUTATION, _MIX, _VIEW = 0, 1, 2
# Views per record a teacher cache may hold (view seeds are unique below this).
MAX_VIEWS = 1024
# Mix modes of a row.
NO_MIX, MIXUP, CUTMIX = 0, 1, 2


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """`(N,)` int64: the order in which epoch `epoch` visits the records."""
  rng = np.random.default_rng([seed, _PERMUTATION, epoch])
  return rng.permutation(num_examples).astype(np.int64)


def view_seeds(seed: int, index: np.ndarray, view: np.ndarray) -> np.ndarray:
  """`(..., 2)` int64 augmentation seed pairs of view `view` of record `index` (same shapes).

  `(seed, -(1 + index * MAX_VIEWS + view))`: a pure function of (seed, record, view), and
  never the seed of a slot of the ordinary stream (`(seed, slot)`, slot >= 0).
  """
  index, view = np.broadcast_arrays(np.asarray(index, np.int64), np.asarray(view, np.int64))
  if np.any((view < 0) | (view >= MAX_VIEWS)):
    raise ValueError(f'view indices must be in [0, {MAX_VIEWS}), got {view.min()}..{view.max()}')
  return np.stack([np.full_like(index, seed), -(1 + index * MAX_VIEWS + view)], axis=-1)


def epoch_views(seed: int, epoch: int, num_examples: int, num_views: int) -> np.ndarray:
  """`(N,)` int32: which of its `num_views` cached views record i shows in epoch `epoch`.

  Views are dealt without replacement: epochs `c*K .. c*K + K-1` (cycle c) show each record its
  K views in the order of a seeded per-record permutation of cycle c. With K >= the number of
  epochs no view is shown twice, as with the live teacher's fresh crops (a view drawn
  independently every epoch would repeat: with K = 30 over 30 epochs a record would show
  about 19 distinct crops).
  """
  cycle, position = divmod(epoch, num_views)
  rng = np.random.default_rng([seed, _VIEW, cycle])
  order = rng.permuted(np.broadcast_to(np.arange(num_views, dtype=np.int32),
                                       (num_examples, num_views)), axis=1)
  return np.ascontiguousarray(order[:, position])


def _check_shards(global_batch: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} out of range for process_count '
                     f'{process_count}')
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f'global batch size {global_batch} is not a positive multiple of '
                     f'process_count {process_count}')
  return global_batch // process_count


@dataclasses.dataclass(frozen=True)
class MixOptions:
  """Mixup / CutMix (off when both alphas are 0).

  Attributes:
    mixup_alpha: Beta(a, a) for mixup's lambda; 0 disables mixup.
    cutmix_alpha: Beta(a, a) for CutMix's lambda; 0 disables CutMix.
    prob: probability that a pair is mixed at all.
    switch_prob: probability of CutMix rather than mixup when both are enabled.
  """

  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  @property
  def enabled(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def mix_params(seed: int, step: int, global_batch: int, options: MixOptions) -> dict:
  """Per-row mixing of the global batch of `step` (rows 2j and 2j+1 form pair j).

  Returns:
    dict of `(B,)` arrays `mode` int32 (NO_MIX / MIXUP / CUTMIX), `lam` float32 (the weight of
    the row's own image and label; for CutMix recomputed from the box in the pipeline) and
    `box` `(B, 4)` float32 (y0, x0, y1, x1) in [0, 1]: the region that CutMix takes from the
    partner.
  """
  pairs = global_batch // 2
  rng = np.random.default_rng([seed, _MIX, step])
  use = rng.random(pairs) < options.prob
  switch = rng.random(pairs) < options.switch_prob
  # The same draws whatever is enabled (a disabled one draws Beta(1, 1), unused).
  a_mixup = options.mixup_alpha if options.mixup_alpha > 0 else 1.0
  a_cutmix = options.cutmix_alpha if options.cutmix_alpha > 0 else 1.0
  lam_mixup = rng.beta(a_mixup, a_mixup, pairs)
  lam_cutmix = rng.beta(a_cutmix, a_cutmix, pairs)
  centre = rng.random((pairs, 2))
  if options.mixup_alpha > 0 and options.cutmix_alpha > 0:
    cut = switch
  else:
    cut = np.full(pairs, options.cutmix_alpha > 0)
  mode = np.where(use, np.where(cut, CUTMIX, MIXUP), NO_MIX).astype(np.int32)
  lam = np.where(mode == MIXUP, lam_mixup, np.where(mode == CUTMIX, lam_cutmix, 1.0))
  half = np.sqrt(1.0 - lam_cutmix)[:, None] / 2.0
  box = np.concatenate([np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)], axis=1)
  box = np.where((mode == CUTMIX)[:, None], box, 0.0)
  rep = lambda a: np.repeat(a, 2, axis=0)
  return {'mode': rep(mode), 'lam': rep(lam).astype(np.float32),
          'box': rep(box).astype(np.float32)}


class TrainPlan:
  """The train schedule of one process (see the module docstring).

  Args:
    num_examples: N, rows of the train table.
    global_batch: B, rows per step over all processes.
    seed: non-negative int.
    process_index, process_count: this process and how many read the stream.
    retries: substitute candidates per row for corrupt images.
    mix: mixup / CutMix options (None: off).
    views: K > 0: rows show one of K fixed views per record (teacher cache; no mixing).
  """

  def __init__(self, num_examples: int, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1, retries: int = 8, mix: MixOptions | None = None,
               views: int = 0):
    self.local_batch = _check_shards(global_batch, process_index, process_count)
    if num_examples < global_batch:
      raise ValueError(f'train split has {num_examples} examples, fewer than the global batch '
                       f'size {global_batch}')
    if seed < 0:
      raise ValueError(f'seed must be non-negative, got {seed}')
    self.mix = mix if mix is not None and mix.enabled else None
    if not 0 <= views <= MAX_VIEWS:
      raise ValueError(f'views must be in [0, {MAX_VIEWS}], got {views}')
    if views and self.mix:
      raise ValueError('mixup/cutmix mixes two images, whose teacher outputs a teacher cache '
                       'cannot hold: set config.data.mixup_alpha and cutmix_alpha to 0, or '
                       'train with the live teacher (no config.teacher.cache)')
    self.views = int(views)
    self._views: dict[int, np.ndarray] = {}
    if self.mix and self.local_batch % 2:
      raise ValueError(f'mixup/cutmix pair rows: the process batch size {self.local_batch} '
                       f'(global {global_batch} / {process_count} processes) must be even')
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.retries = retries
    self.steps_per_epoch = num_examples // global_batch
    self._orders: dict[int, np.ndarray] = {}

  def order(self, epoch: int) -> np.ndarray:
    """The epoch's permutation (the last two are kept)."""
    if epoch not in self._orders:
      if len(self._orders) >= 2:
        self._orders.pop(min(self._orders))
      self._orders[epoch] = epoch_permutation(self.seed, epoch, self.num_examples)
    return self._orders[epoch]

  def view_choice(self, epoch: int) -> np.ndarray:
    """`(N,)` int32 view of each record in `epoch` (`epoch_views`; the last two are kept)."""
    if epoch not in self._views:
      if len(self._views) >= 2:
        self._views.pop(min(self._views))
      self._views[epoch] = epoch_views(self.seed, epoch, self.num_examples, self.views)
    return self._views[epoch]

  @property
  def rows(self) -> np.ndarray:
    """`(b,)` int64: the global-batch rows this process reads (the same at every step)."""
    start = self.process_index * self.local_batch
    return np.arange(start, start + self.local_batch, dtype=np.int64)

  def positions(self, step: int) -> tuple[int, np.ndarray]:
    """`(epoch, (b,) positions in the epoch's order)` of this process's rows at `step`."""
    if step < 0:
      raise ValueError(f'step must be non-negative, got {step}')
    epoch, within = divmod(step, self.steps_per_epoch)
    return epoch, within * self.global_batch + self.rows

  def step(self, step: int) -> dict[str, np.ndarray]:
    """What this process reads at `step`.

    Returns:
      dict of arrays with leading dimension b = B / P: `candidates` `(b, 1 + retries)` int64
      record indices (the scheduled record first, then its substitutes), `seed` `(b, 2)` int64
      augmentation seeds, and when mixing is on `partner` `(b,)` int32 (row within the process
      batch), `mode`, `lam`, `box` (see `mix_params`). With `views` > 0 also
      `candidate_views` `(b, 1 + retries)` int32 and `candidate_seeds` `(b, 1 + retries, 2)`
      int64: each candidate's view this epoch and its seeds (which replace `seed`).
    """
    epoch, pos = self.positions(step)
    order = self.order(epoch)
    n = self.num_examples
    offsets = np.arange(1 + self.retries, dtype=np.int64)
    out = {
        'candidates': order[(pos[:, None] + offsets[None, :]) % n],
        'seed': np.stack([np.full_like(pos, self.seed), epoch * n + pos], axis=1),
    }
    if self.views:
      views = self.view_choice(epoch)[out['candidates']]
      out['candidate_views'] = views
      out['candidate_seeds'] = view_seeds(self.seed, out['candidates'], views)
    if self.mix:
      mix = mix_params(self.seed, step, self.global_batch, self.mix)
      out.update({k: v[self.rows] for k, v in mix.items()})
      out['partner'] = (np.arange(self.local_batch) ^ 1).astype(np.int32)
    return out


def eval_indices(num_examples: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
  """`(steps, b)` int64 record indices this process evaluates, -1 for padding.

  `steps = ceil(N / B)`; global batch k holds records `[k*B, (k+1)*B)` and process i its rows
  `[i*b, (i+1)*b)`.
  """
  b = _check_shards(global_batch, process_index, process_count)
  steps = max(1, math.ceil(num_examples / global_batch))
  flat = np.arange(steps * global_batch, dtype=np.int64)
  flat[flat >= num_examples] = -1
  return flat.reshape(steps, global_batch)[:, process_index * b:(process_index + 1) * b]
