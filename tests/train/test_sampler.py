"""The step sampler: every sample once per epoch, disjoint rank slices covering each global batch,
and batches that depend only on (seed, step), so a resumed run sees what an uninterrupted one saw."""

from collections import Counter

import numpy as np
import pytest

from radio_distill.train.reader import StepSampler

INDICES = np.array([3, 5, 8, 13, 21, 34, 55, 89, 144, 233])  # store rows of a split


def sampler(**kw):
    return StepSampler(INDICES, **{"views": 3, "batch_size": 4, "seed": 0, "start_step": 0, "steps": 10, **kw})


def test_every_sample_once_per_epoch_with_one_of_its_views():
    items = [item for batch in sampler() for item in batch]  # 10 steps x 4 = 4 epochs of 10
    assert len(items) == 40
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
        assert not {i for i, _ in a} & {i for i, _ in b}
    with pytest.raises(ValueError, match="global batch 4 is not divisible by 3 processes"):
        sampler(world=3)


def test_resume_at_step_k_yields_the_batches_of_an_uninterrupted_run():
    whole = list(sampler())
    for k in (1, 3, 7):
        assert list(sampler(start_step=k)) == whole[k:]
        assert len(sampler(start_step=k)) == 10 - k
    assert list(sampler(seed=1)) != whole
