"""Layout helpers that decide which bytes go where."""

from radio_distill.store import layout as L


def test_statistics_shards_spread_over_the_dataset():
    assert L.stat_shards(5) == [0, 1, 2, 3, 4]
    spread = L.stat_shards(5000)
    assert len(spread) == L.STAT_SHARDS and spread[0] == 0 and spread[-1] == 4999
    gaps = [b - a for a, b in zip(spread, spread[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced, not the leading (first-classes-only) shards


def test_shard_rows_cover_every_sample_once():
    rows = [L.shard_rows(k, 4, 10) for k in range(L.shard_count(10, 4))]
    assert [(r.start, r.stop) for r in rows] == [(0, 4), (4, 8), (8, 10)]
