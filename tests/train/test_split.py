"""The lazy split (`Split`) and the sampler's draws from it, on stores of known status, split keys and done
shards: what is drawn is usable and in the split, every usable row of it is drawn within an epoch of
candidates, a resume sees the same batches, and the open reads no status or split key however large the
store (the status chunk made small here, so a few thousand rows are many blocks)."""

import numpy as np
import pytest

from radio_distill.errors import DatasetError
from radio_distill.store import layout as L
from radio_distill.store import reader as reader_module
from radio_distill.store.dataset import Manifest
from radio_distill.store.group import create_store, open_array
from radio_distill.store.layout import TeacherInfo
from radio_distill.store.lock import build_lock
from radio_distill.store.reader import CacheReader, Split, StepSampler, is_held_out

SHARD, CHUNK, HOLDOUT = 64, 256, 0.2
UNDONE = (5, 20)  # shards not done: their rows are never drawn


def status_of(n: int) -> np.ndarray:
    """Known status: every 7th row unreadable, every 11th absent (an unlisted tar's unused row), the rest ok."""
    rows = np.arange(n)
    return np.where(rows % 11 == 5, L.ABSENT, np.where(rows % 7 == 3, L.UNREADABLE, L.OK)).astype(np.uint8)


def write(path, n: int, monkeypatch) -> list[str]:
    """A store of n samples in shards of SHARD, status chunks of CHUNK rows, every shard done but UNDONE;
    returns its ids."""
    monkeypatch.setattr(L, "STATUS_CHUNK", CHUNK)
    ids = [f"c{r % 13}/img{r:06d}.jpg" for r in range(n)]
    manifest = Manifest(path.parent / "images", tuple(ids), (0,) * n, ("c",))
    settings = {"teachers": {"t": {"family": "t"}}, "storage": {"t": {"spatial": "int8", "summary": "fp16", "pool": 1}},
                "pixels": None, "views": 1, "seed": 0, "shard_size": SHARD, "dataset": "lazy", "num_samples": n}
    info = {"t": TeacherInfo(32, (0.5,) * 3, (0.5,) * 3, (2, 2), 8, 8)}
    with build_lock(path):
        create_store(path, manifest=manifest, settings=settings, infos=info)
        open_array(path, L.STATUS).write(status_of(n)).result()
        done = np.ones(L.shard_count(n, SHARD), np.uint8)
        done[list(UNDONE)] = 0
        open_array(path, L.done_array("t")).write(done).result()
    return ids


def expected(ids: list[str], split: str) -> list[int]:
    """The split's rows by its definition: ok, in a done shard, held out by the id's hash or not."""
    ok = status_of(len(ids)) == L.OK
    return [r for r, i in enumerate(ids) if ok[r] and r // SHARD not in UNDONE
            and is_held_out(i, HOLDOUT) == (split == "holdout")]


@pytest.fixture
def lazy(tmp_path, monkeypatch):
    n = 2000  # 32 shards, the last of 16 rows; 8 status chunks
    path = tmp_path / "lazy.zarr"
    ids = write(path, n, monkeypatch)
    return CacheReader(path, allow_partial=True), ids


def test_the_split_holds_the_usable_rows_on_its_side(lazy):
    reader, ids = lazy
    for split in ("train", "holdout"):
        rows, want = reader.indices(holdout=HOLDOUT, split=split), expected(ids, split)
        assert rows.reads == 0  # nothing read until used
        assert len(rows) == len(want) and rows.tolist() == want and np.asarray(rows).tolist() == want
        rng = np.random.default_rng(0)
        positions = rng.integers(0, len(want), 50)
        assert rows[positions].tolist() == np.asarray(want)[positions].tolist() and rows[7] == want[7]
        values = rng.integers(-5, len(ids) + 100, 80)
        assert rows.searchsorted(values).tolist() == np.searchsorted(want, values).tolist()
    usable = int(((status_of(len(ids)) == L.OK) & (np.arange(len(ids)) // SHARD != 5)
                  & (np.arange(len(ids)) // SHARD != 20)).sum())
    assert reader.num_usable == usable == len(expected(ids, "train")) + len(expected(ids, "holdout"))
    assert reader.absent == int((status_of(len(ids)) == L.ABSENT).sum())


def test_every_draw_is_a_usable_train_row_and_every_one_is_drawn_within_an_epoch(lazy):
    reader, ids = lazy
    want = set(expected(ids, "train"))
    rows = reader.indices(holdout=HOLDOUT)
    assert rows.space == 30 * SHARD  # candidates: the rows of the 30 done shards
    sampler = StepSampler(rows, views=1, resolution=32, batch_size=SHARD, seed=3, start_step=0, steps=60)
    epochs = [[i for step in range(30 * e, 30 * (e + 1)) for i, _ in sampler.global_batch(step)] for e in range(2)]
    for drawn in epochs:
        assert set(drawn) == want  # all drawn are usable train rows, and all of them are drawn
        assert len(drawn) == rows.space  # an epoch of candidates: the unusable ones' places redrawn
    assert epochs[0] != epochs[1]


def test_a_resume_draws_what_an_uninterrupted_run_draws(lazy):
    reader, _ = lazy
    kw = dict(views=1, resolution=32, batch_size=24, seed=1, steps=120)
    whole = list(StepSampler(reader.indices(holdout=HOLDOUT), start_step=0, **kw))
    again = CacheReader(reader.path, allow_partial=True)  # a fresh process: nothing read yet
    resumed = list(StepSampler(again.indices(holdout=HOLDOUT), start_step=77, **kw))
    assert resumed == whole[77:]


def test_a_split_of_few_usable_rows_is_drawn_from_and_an_empty_one_refused(lazy):
    reader, ids = lazy
    few = reader.indices(holdout=0.002, split="holdout")  # a handful of rows among 1920 candidates
    want = {r for r in expected(ids, "train") + expected(ids, "holdout") if is_held_out(ids[r], 0.002)}
    assert 0 < len(want) < 10 and set(few.tolist()) == want
    drawn = {i for step in range(40) for i, _ in StepSampler(few, views=1, resolution=32, batch_size=48, seed=0,
                                                             start_step=0, steps=40).global_batch(step)}
    assert drawn == want  # the next usable row in row order after REDRAWS misses: still only usable ones
    with pytest.raises(DatasetError, match="no usable samples to train on"):
        StepSampler(reader.indices(holdout=0.0, split="holdout"), views=1, resolution=32, batch_size=4, seed=0,
                    start_step=0, steps=1)


@pytest.mark.parametrize("n", [2000, 8000])
def test_the_open_reads_no_status_or_split_key(tmp_path, monkeypatch, n):
    """Opening, taking the split and choosing the image check's rows read the status and split keys of at most
    2 blocks: the same count at 8 and 32 blocks."""
    write(tmp_path / "s.zarr", n, monkeypatch)
    reads = []
    real = reader_module.read_rows

    def counted(store, handle, array, *args, **kw):
        reads.append(array)
        return real(store, handle, array, *args, **kw)

    monkeypatch.setattr(reader_module, "read_rows", counted)
    reader = CacheReader(tmp_path / "s.zarr", allow_partial=True)
    split = reader.indices(holdout=HOLDOUT)
    assert reads == []
    picked = reader.sample_rows(split, 64, shards=8)
    assert reads.count(L.STATUS) == reads.count(L.SPLIT) == split.reads // 2 == 2
    assert len(picked) and set(picked.tolist()) <= set(split.tolist())
    assert isinstance(split, Split) and len(split) > 0
