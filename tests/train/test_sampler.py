"""The step sampler: every sample once per epoch, disjoint rank slices covering each global batch,
and batches that depend only on (seed, step), so a resumed run sees what an uninterrupted one saw."""

from collections import Counter

import numpy as np
import pytest

from radio_distill.errors import DatasetError
from radio_distill.store.reader import StepSampler

INDICES = np.array([3, 5, 8, 13, 21, 34, 55, 89, 144, 233])  # store rows of a split


def sampler(**kw):
    return StepSampler(INDICES, **{"views": 3, "resolution": 32, "batch_size": 4, "seed": 0, "start_step": 0,
                                   "steps": 10, **kw})


def test_every_sample_once_per_epoch_with_one_of_its_views():
    items = [item for batch in sampler() for item in batch]  # 10 steps x 4 = 4 epochs of 10
    assert len(items) == 40 and {side for _, _, side in items} == {32}
    items = [(i, v) for i, v, _ in items]
    for epoch in range(4):
        rows = [i for i, _ in items[10 * epoch:10 * (epoch + 1)]]
        assert sorted(rows) == INDICES.tolist(), epoch
    assert {v for _, v in items} == {0, 1, 2}
    orders = [tuple(i for i, _ in items[10 * e:10 * (e + 1)]) for e in range(4)]
    assert len(set(orders)) == 4  # a new permutation every epoch


def test_ranks_take_disjoint_slices_covering_the_global_batch():
    whole = list(sampler())
    parts = [list(sampler(batch_size=4, rank=r, world=2)) for r in range(2)]
    for step, batch in enumerate(whole):
        a, b = parts[0][step], parts[1][step]
        assert len(a) == len(b) == 2
        assert Counter(a) + Counter(b) == Counter(batch)
        assert a == batch[0::2] and b == batch[1::2]  # by position: a sample may recur where epochs meet
    with pytest.raises(ValueError, match="global batch 4 is not divisible by 3 processes"):
        sampler(world=3)


def test_resume_at_step_k_yields_the_batches_of_an_uninterrupted_run():
    whole = list(sampler())
    for k in (1, 3, 7):
        assert list(sampler(start_step=k)) == whole[k:]
        assert len(sampler(start_step=k)) == 10 - k
    assert list(sampler(seed=1)) != whole


def sides_of(batches) -> list[set]:
    return [{side for _, _, side in batch} for batch in batches]


def test_random_policy_draws_each_step_one_side_from_seed_and_step_alone():
    whole = list(sampler(resolution=(32, 48, 64)))
    sides = sides_of(whole)
    assert len(whole) == 10 and all(len(s) == 1 for s in sides) and set().union(*sides) == {32, 48, 64}
    plain = list(sampler())  # the side drawn changes no sample or view of a step
    assert [[(i, v) for i, v, _ in b] for b in whole] == [[(i, v) for i, v, _ in b] for b in plain]
    ranks = [list(sampler(resolution=(32, 48, 64), rank=r, world=2)) for r in range(2)]
    assert sides_of(ranks[0]) == sides_of(ranks[1]) == sides  # every DDP rank: the same side each step
    assert list(sampler(resolution=(32, 48, 64), start_step=6)) == whole[6:]  # resume
    assert sides_of(sampler(resolution=(32, 48, 64), seed=1)) != sides
    two = sides_of(sampler(resolution=(32, 64), steps=40))  # two sides: also drawn, not always the first
    assert set().union(*two) == {32, 64}


def test_partition_policy_splits_every_global_batch_into_one_part_per_side():
    kw = dict(resolution=(32, 64), batch_size=(4, 2), policy="partition")
    parts = list(sampler(**kw))
    assert len(parts) == len(sampler(**kw)) == 20 and [len(p) for p in parts[:2]] == [4, 2]
    assert sides_of(parts) == [{32}, {64}] * 10
    whole = sampler(**kw)
    for step in range(10):  # the parts of step t are global batch t of 6 samples, the first 4 at 32
        assert [(i, v) for i, v, _ in parts[2 * step] + parts[2 * step + 1]] == whole.global_batch(step)
    rows = [i for p in parts for i, _, _ in p]  # 60 = 6 epochs, each sample once per epoch
    assert all(sorted(rows[10 * e:10 * (e + 1)]) == INDICES.tolist() for e in range(6))
    ranks = [list(sampler(**kw, rank=r, world=2)) for r in range(2)]
    assert [len(p) for p in ranks[0][:2]] == [2, 1]
    assert all(Counter(a) + Counter(b) == Counter(p) for a, b, p in zip(*ranks, parts))
    assert list(sampler(**kw, start_step=3)) == parts[6:]
    with pytest.raises(ValueError, match="global batch 2 is not divisible by 4 processes"):
        sampler(**kw, world=4)


def test_partition_with_three_sides_gives_each_its_own_consecutive_items():
    kw = dict(resolution=(32, 48, 64), batch_size=(2, 1, 3), policy="partition")
    parts, whole = list(sampler(**kw)), sampler(**kw)
    assert len(parts) == 30 and sides_of(parts) == [{32}, {48}, {64}] * 10
    for step in range(10):
        batch = whole.global_batch(step)
        assert [[(i, v) for i, v, _ in p] for p in parts[3 * step:3 * step + 3]] == [batch[:2], batch[2:3], batch[3:]]


def test_bad_batch_sizes_and_an_empty_split_are_refused():
    with pytest.raises(ValueError, match=r"^batch sizes \(4, 2\) do not match sides \(32, 48, 64\) under policy "
                                         r"'partition'$"):
        sampler(resolution=(32, 48, 64), batch_size=(4, 2), policy="partition")
    with pytest.raises(ValueError, match=r"^batch sizes \(4, 2\) do not match sides \(32, 64\) under policy 'random'$"):
        sampler(resolution=(32, 64), batch_size=(4, 2))
    with pytest.raises(DatasetError, match=r"^no usable samples to train on \(all unreadable, held out, or in "
                                           r"unfinished shards\)$"):
        StepSampler(np.array([], dtype=np.int64), views=1, resolution=32, batch_size=4, seed=0, start_step=0, steps=1)
    one = StepSampler(np.array([7]), views=1, resolution=32, batch_size=2, seed=0, start_step=0, steps=2)
    assert list(one) == [[(7, 0, 32), (7, 0, 32)]] * 2  # one sample: every epoch is that sample


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 65537])
def test_the_epoch_permutation_maps_every_position_to_a_distinct_sample(n):
    """`permute` replaces an (n,) shuffle (760 MB at 95M samples): it must be a bijection of range(n) for any n,
    the same for the same key, and another for another epoch."""
    from radio_distill.store.reader import permute

    order = permute(np.arange(n), n, (0, 0))
    assert sorted(order.tolist()) == list(range(n))
    assert permute(np.arange(n), n, (0, 0)).tolist() == order.tolist()
    assert permute(np.array([n - 1, 0]), n, (0, 0)).tolist() == [order[-1], order[0]]  # any positions, any order
    if n >= 7:
        assert permute(np.arange(n), n, (0, 1)).tolist() != order.tolist() != list(range(n))
