"""`store_info` and `verify_store`: what a store holds, and every way its bytes can be unsound."""

import shutil

import numpy as np
import pytest
import zarr

from radio_distill.store import layout as L
from radio_distill.store.inspect import repair_store, store_info, verify_store
from radio_distill.store.lock import build_lock
from radio_distill.store.dataset import scan_dataset
from radio_distill.cache.build import shard_samples
from radio_distill.store.group import commit_shards, lost_shards, open_array, open_store
from radio_distill.cache.sample_data import BAD_FILES, CLASSES
from radio_distill.errors import CacheIntegrityError

N, V, S = 58, 2, 4


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    """A private copy of the tiny store, to damage."""
    return shutil.copytree(tiny_store, tmp_path / "copy.zarr")


def _flip_middle(path, count=32) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


def test_info_describes_the_store(tiny_store, sample_dataset):
    info = store_info(tiny_store)
    assert (info["samples"], info["views"], info["shard_size"], info["seed"]) == (N, V, S, 0)
    assert info["shards_total"] == info["shards_done"] == L.shard_count(N, S)
    assert info["dataset"] == str(sample_dataset.resolve()) and info["classes"] == list(CLASSES)
    assert (info["dataset_kind"], info["dataset_files"]) == ("folder", 0)
    assert info["ok"] == N - len(BAD_FILES) and info["pending"] == 0 and info["unreadable"] == BAD_FILES
    assert info["layout_version"] == L.LAYOUT_VERSION and info["created_by"].startswith("radio-distill ")
    assert sorted(info["teachers"]) == ["clip", "dinov2", "sam"]
    recorded = zarr.open_group(tiny_store, mode="r")[L.SHARDS].attrs["arrays"]  # a file per shard: the bulk
    disk = sum(p.stat().st_size for a in recorded for p in (tiny_store / a).rglob("*") if p.is_file() and p.name != "zarr.json")
    assert info["bytes"] == disk
    for name, t in info["teachers"].items():
        assert t["shards_done"] == info["shards_total"] and t["fidelity"]["spatial"]["mean_cos"] >= 0.999
        targets = [d for d in (tiny_store / "teachers" / name).iterdir()
                   if d.name in ("summary", "spatial", "summary_scale", "spatial_scale")]  # not moments/, norm/
        teacher_disk = sum(p.stat().st_size for d in targets for p in d.rglob("*") if p.is_file() and p.name != "zarr.json")
        assert t["bytes"] == teacher_disk and t["bytes_per_view"] == pytest.approx(teacher_disk / (N * V))
    assert info["teachers"]["sam"]["summary_dim"] is None and info["teachers"]["clip"]["summary_dim"] == 32


def test_info_counts_only_done_shards(store_copy):
    """A shard whose statuses are written but whose done flag is not (a build killed mid-shard) is pending."""
    root = zarr.open_group(store_copy, mode="r+")
    ids, status = root[L.IDS][:], root[L.STATUS][:]
    shard = list(ids).index("empty.jpg") // S
    root[L.done_array("sam")][shard] = 0
    rows = L.shard_rows(shard, S, N)
    info = store_info(store_copy)
    assert info["shards_done"] == L.shard_count(N, S) - 1 and info["pending"] == rows.stop - rows.start == S
    outside = np.r_[status[:rows.start], status[rows.stop:]]
    assert info["ok"] == int((outside == L.OK).sum()) == N - len(BAD_FILES) - int((status[rows] == L.OK).sum())
    assert info["unreadable"] == {k: v for k, v in BAD_FILES.items() if k not in ids[rows]}
    assert "empty.jpg" not in info["unreadable"] and info["unreadable"]


def test_verify_passes_a_sound_store(tiny_store):
    report = verify_store(tiny_store)
    assert report["ok"] and report["samples"] == N
    # sample arrays (ids labels boxes status errors sources); moments and norm per target (clip, dinov2: 2; sam: 1);
    # targets (clip, dinov2: 2 + 1 scale; sam: 1 + 1)
    assert report["arrays"] == 6 + 4 * 5 + 2 * 5 + 3 + 3 + 2 and report["records"]


def test_verify_names_the_array_and_sample_of_a_corrupted_chunk(store_copy):
    ids = zarr.open_group(store_copy, mode="r")[L.IDS][:]
    shard_file = store_copy / L.target_array("clip", "spatial") / "c" / "1" / "0" / "0" / "0" / "0"
    assert shard_file.is_file()
    _flip_middle(shard_file)
    with pytest.raises(CacheIntegrityError) as e:
        verify_store(store_copy)
    message = str(e.value)
    assert message.startswith(f"{L.target_array('clip', 'spatial')}: sample '") and "\n" not in message
    named = message.split("'")[1]
    assert named in ids[S:2 * S]  # a sample of shard 1


def test_verify_names_a_corrupted_sample_array(store_copy):
    _flip_middle(store_copy / L.LABELS / "c" / "3", count=4)
    with pytest.raises(CacheIntegrityError, match=f"^{L.LABELS}: unreadable chunk"):
        verify_store(store_copy)


def test_verify_names_an_unfinished_shard(store_copy):
    zarr.open_group(store_copy, mode="r+")[L.done_array("dinov2")][3] = 0
    with pytest.raises(CacheIntegrityError, match=r"^teachers/dinov2/done: shard 3 is not done \(1 of 15 missing\); "
                                                  r"rerun `radio-cache build`"):
        verify_store(store_copy)


def test_verify_names_a_sample_never_processed_and_non_finite_targets(store_copy, record_again):
    root = zarr.open_group(store_copy, mode="r+")
    ids = root[L.IDS][:]
    root[L.STATUS][7] = L.PENDING  # the driver's: no per-shard record
    with pytest.raises(CacheIntegrityError, match=f"sample '{ids[7]}' was never processed"):
        verify_store(store_copy)
    root[L.STATUS][7] = L.OK
    summary = root[L.target_array("dinov2", "summary")]
    value = summary[9]
    value[1, 5] = np.inf
    summary[9] = value
    record_again(store_copy, L.target_array("dinov2", "summary"))
    with pytest.raises(CacheIntegrityError, match=f"teachers/dinov2/summary: sample '{ids[9]}' holds NaN or inf"):
        verify_store(store_copy)


@pytest.mark.parametrize("array", [L.target_array("clip", "spatial"), L.scale_array("clip", "spatial"),
                                   L.target_array("dinov2", "summary"), L.BOXES])
def test_verify_names_a_done_shard_whose_file_is_gone(store_copy, array):
    """Zarr reads a missing shard as fill values: training would learn all-zero targets for it."""
    root = open_store(store_copy)
    key = root[array].metadata.encode_chunk_key((2,) + (0,) * (root[array].ndim - 1))
    (store_copy / array / key).unlink()
    assert lost_shards(store_copy, root) == [(array, 2, "is done but its file is gone")]
    with pytest.raises(CacheIntegrityError) as e:
        verify_store(store_copy)
    assert str(e.value) == (f"{array}: shard 2 (samples 8-11) is done but its file is gone (1 shard files lost or "
                            f"altered); run `radio-cache verify {store_copy} --repair`, then rerun the same "
                            "`radio-cache build` to redo it")


def test_repair_marks_the_shards_whose_files_are_gone_not_done(store_copy):
    """A rerun lists no files (its cost would grow with the store): `verify --repair` finds the lost ones and
    clears their shards' done flags, for every teacher, so that the rerun redoes them."""
    root = open_store(store_copy)
    for array, shard in ((L.target_array("sam", "spatial"), 5), (L.BOXES, 5), (L.IDS, 9)):
        key = root[array].metadata.encode_chunk_key((shard,) + (0,) * (root[array].ndim - 1))
        (store_copy / array / key).unlink()
    found = repair_store(store_copy)
    assert sorted(found) == [5, 9] and "is done but its file is gone" in found[9]
    flags = {name: root[L.done_array(name)][:] for name in ("clip", "dinov2", "sam")}
    assert all(f[5] == 0 == f[9] and f.sum() == L.shard_count(N, S) - 2 for f in flags.values())
    assert lost_shards(store_copy, root) == [] and repair_store(store_copy) == {}  # not done: nothing claims them


def test_every_written_shard_has_its_file_even_when_all_zeros(store_copy):
    """tensorstore skips chunks equal to the fill value: a shard of unreadable samples would look lost."""
    array = L.target_array("clip", "spatial")
    root = open_store(store_copy)
    before = (store_copy / array / "c/0/0/0/0/0").stat().st_size
    open_array(store_copy, array)[0:S].write(np.zeros((S, *root[array].shape[1:]), np.int8)).result()
    assert (store_copy / array / "c/0/0/0/0/0").stat().st_size != before  # the file is there, holding zeros
    assert lost_shards(store_copy, root) == [(array, 0, f"file is {(store_copy / array / 'c/0/0/0/0/0').stat().st_size}"
                                              f" bytes, {before} when it was written (cut short, replaced or swapped "
                                              "with another shard's)")]


def test_temporary_files_of_a_killed_write_are_never_read_or_counted_and_the_shards_redo_deletes_them(
        store_copy, tiny_store, tiny_specs, sample_dataset, file_digests):
    """A kill in a chunk write leaves Zarr's `<key>.<uuid>.partial` beside the chunk (it writes there, then renames)."""
    before = {k: v for k, v in store_info(store_copy).items() if k != "store"}
    stray = {(array, k): store_copy / array / f"c/{k}{'/0' * (ndim - 1)}.{'ab' * 16}.partial"
             for array, ndim in ((L.ERRORS, 1), (L.BOXES, 3), (L.SOURCES, 2)) for k in (3, 6)}
    for path in stray.values():
        path.write_bytes(b"\x00" * 1000)  # cut short: it would not decode
    assert {k: v for k, v in store_info(store_copy).items() if k != "store"} == before  # its bytes not counted
    verify_store(store_copy)
    assert lost_shards(store_copy, open_store(store_copy)) == []

    # shard 3 is redone (its last done flag was being written): only its temporary files go
    root = open_store(store_copy, mode="r+")
    root[L.done_array("sam")][3] = 0
    from radio_distill.cache.worker import ShardWorker

    worker = ShardWorker(tuple(tiny_specs[name] for name in ("clip", "dinov2", "sam")), str(store_copy), batch_size=8,
                         threads=1)
    samples = shard_samples(scan_dataset(sample_dataset), 3, S)
    with build_lock(store_copy) as token:
        commit_shards(store_copy, root, {3: worker.run(3, str(sample_dataset), token, samples)})
    assert sorted(key for key, path in stray.items() if path.exists()) == [(a, 6) for a in sorted(
        (L.ERRORS, L.BOXES, L.SOURCES))]
    for path in stray.values():
        path.unlink(missing_ok=True)
    verify_store(store_copy)
    assert file_digests(store_copy) == file_digests(tiny_store)
