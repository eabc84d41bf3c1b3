"""Schedules: pure functions of (seed, step); epochs, shards, substitutes, mixing, eval cover."""

import numpy as np
import pytest

from kdflax.data import plan as plan_lib
from kdflax.data.plan import MixOptions, TrainPlan, epoch_views, eval_indices


def test_each_epoch_visits_a_fresh_permutation():
  orders = [plan_lib.epoch_permutation(3, e, 50) for e in range(3)]
  for order in orders:
    assert sorted(order.tolist()) == list(range(50))
  assert not np.array_equal(orders[0], orders[1])
  np.testing.assert_array_equal(orders[0], plan_lib.epoch_permutation(3, 0, 50))
  assert not np.array_equal(orders[0], plan_lib.epoch_permutation(4, 0, 50))


def test_steps_of_an_epoch_read_distinct_records_and_drop_the_remainder():
  p = TrainPlan(num_examples=23, global_batch=5, seed=1, retries=0)
  assert p.steps_per_epoch == 4
  for epoch in range(2):
    seen = np.concatenate([p.step(epoch * 4 + s)['candidates'][:, 0] for s in range(4)])
    assert len(set(seen.tolist())) == 20
    np.testing.assert_array_equal(seen, plan_lib.epoch_permutation(1, epoch, 23)[:20])


def test_a_step_does_not_depend_on_what_was_asked_before():
  walked = TrainPlan(40, 8, seed=7, mix=MixOptions(0.4, 1.0))
  steps = [walked.step(s) for s in range(12)]
  for s in (11, 3, 7, 0):
    fresh = TrainPlan(40, 8, seed=7, mix=MixOptions(0.4, 1.0)).step(s)
    for key, value in fresh.items():
      np.testing.assert_array_equal(value, steps[s][key])


def test_substitutes_are_the_following_records_of_the_order():
  p = TrainPlan(10, 4, seed=2, retries=3)
  step = p.step(1)  # positions 4..7 of epoch 0
  order = plan_lib.epoch_permutation(2, 0, 10)
  for r, pos in enumerate(range(4, 8)):
    np.testing.assert_array_equal(step['candidates'][r], order[[(pos + j) % 10 for j in range(4)]])
  # Seeds are (seed, slot), slot unique over the stream.
  slots = np.concatenate([p.step(s)['seed'][:, 1] for s in range(6)])
  assert len(set(slots.tolist())) == 24 and np.all(p.step(0)['seed'][:, 0] == 2)


@pytest.mark.parametrize('mix', [None, MixOptions(mixup_alpha=0.8, cutmix_alpha=1.0)])
def test_process_shards_concatenate_to_the_global_batch(mix):
  whole = TrainPlan(64, 16, seed=5, mix=mix)
  for count in (2, 4):
    shards = [TrainPlan(64, 16, seed=5, process_index=i, process_count=count, mix=mix)
              for i in range(count)]
    assert all(s.local_batch == 16 // count for s in shards)
    for step in (0, 3, 9):
      expected = whole.step(step)
      parts = [s.step(step) for s in shards]
      for key, value in expected.items():
        if key == 'partner':  # local row index of the partner
          for part in parts:
            np.testing.assert_array_equal(part[key], np.arange(16 // count) ^ 1)
          continue
        np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), value)


def test_mix_params_pair_rows_and_respect_options():
  both = plan_lib.mix_params(0, 3, 64, MixOptions(0.5, 1.0, prob=1.0, switch_prob=0.5))
  for key in ('mode', 'lam', 'box'):
    np.testing.assert_array_equal(both[key][0::2], both[key][1::2])  # pairs share params
  assert set(both['mode'].tolist()) == {plan_lib.MIXUP, plan_lib.CUTMIX}
  assert np.all((both['lam'] >= 0) & (both['lam'] <= 1))
  cut = both['mode'] == plan_lib.CUTMIX
  box = both['box']
  assert np.all(box[cut][:, :2] <= box[cut][:, 2:]) and np.all(box[~cut] == 0)
  only_mixup = plan_lib.mix_params(0, 3, 64, MixOptions(mixup_alpha=0.5))
  assert set(only_mixup['mode'].tolist()) == {plan_lib.MIXUP}
  never = plan_lib.mix_params(0, 3, 64, MixOptions(cutmix_alpha=1.0, prob=0.0))
  assert np.all(never['mode'] == plan_lib.NO_MIX) and np.all(never['lam'] == 1)


def test_plan_errors_are_clear():
  with pytest.raises(ValueError, match='multiple of process_count'):
    TrainPlan(64, 10, seed=0, process_count=4)
  with pytest.raises(ValueError, match='fewer than the global batch'):
    TrainPlan(7, 8, seed=0)
  with pytest.raises(ValueError, match='must be even'):
    TrainPlan(64, 6, seed=0, process_count=2, mix=MixOptions(mixup_alpha=1.0))
  with pytest.raises(ValueError, match='non-negative'):
    TrainPlan(64, 8, seed=-1)
  with pytest.raises(ValueError, match='out of range'):
    TrainPlan(64, 8, seed=0, process_index=2, process_count=2)


@pytest.mark.parametrize('n,batch,count', [(11, 4, 2), (12, 4, 1), (5, 8, 4), (1, 2, 2)])
def test_eval_indices_cover_every_record_once_with_padding(n, batch, count):
  parts = [eval_indices(n, batch, i, count) for i in range(count)]
  steps = -(-n // batch)
  assert all(p.shape == (steps, batch // count) for p in parts)
  flat = np.concatenate(parts, axis=1).reshape(-1)  # global batches, in order
  np.testing.assert_array_equal(flat[:n], np.arange(n))
  assert np.all(flat[n:] == -1)


@pytest.mark.parametrize('views', [1, 3, 8])
def test_cached_views_are_dealt_without_replacement(views):
  # K consecutive epochs (a cycle) show every record each of its K views exactly once; the
  # order is a pure function of (seed, cycle) and differs between cycles and records.
  n = 50
  cycles = [np.stack([epoch_views(7, c * views + p, n, views) for p in range(views)], axis=1)
            for c in range(3)]
  for shown in cycles:
    assert shown.dtype == np.int32 and shown.shape == (n, views)
    np.testing.assert_array_equal(np.sort(shown, axis=1), np.tile(np.arange(views), (n, 1)))
  np.testing.assert_array_equal(epoch_views(7, 4, n, views), epoch_views(7, 4, n, views))
  if views > 2:
    assert not np.array_equal(cycles[0], cycles[1])
    assert len({tuple(row) for row in cycles[0]}) > 1
