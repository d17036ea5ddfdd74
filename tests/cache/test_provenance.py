"""Nothing lost quietly: what each target was computed from, and what each shard wrote, are recorded and
checked — a replaced image, a lost sample-array or norm chunk, two shard files swapped."""

import os
import shutil

import numpy as np
import pytest
import zarr
from PIL import Image

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.store.inspect import repair_store, verify_store
from radio_distill.store.provenance import digest
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.store.group import open_store, shard_key
from radio_distill.errors import CacheIntegrityError, DatasetError
from radio_distill.store.reader import CacheReader

from .conftest import SMALL_STORE

S, N = 2, 8  # the small store: 8 images, shards of 2


@pytest.fixture
def store_copy(small_store, tmp_path):
    return shutil.copytree(small_store, tmp_path / "cache.zarr")


def _file(store, array: str, shard: int):
    root = open_store(store)
    return store / array / shard_key(root[array].metadata, array, shard, L.shard_count(N, S))


def _replace(image_path, seed: int) -> None:
    """Another picture under the same name (a few bytes differ at least; the size may stay)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(image_path, format="JPEG", quality=90)


@pytest.fixture
def own_store(ray_session, small_dataset, tmp_path):
    """A store built from a private copy of the small dataset (which the test may change): (store, dataset)."""
    data = shutil.copytree(small_dataset, tmp_path / "images")
    out = tmp_path / "own.zarr"
    report = build_cache(load_cache_config(data=data, out=out, **SMALL_STORE), progress=False)
    assert report["complete"] and report["ok"] == N
    return out, data


def test_sources_record_the_bytes_each_target_came_from(small_store, small_dataset):
    root = zarr.open_group(small_store, mode="r")
    ids, sources = root[L.IDS][:], root[L.SOURCES][:]
    for i, sample in enumerate(ids):
        path = small_dataset / str(sample)
        data = path.read_bytes()
        assert sources[i].tolist() == [len(data), path.stat().st_mtime_ns, digest(data)]


@pytest.mark.slow
def test_a_replaced_image_is_noticed_by_verify_training_and_a_rerun(own_store, capfd):
    store, data = own_store
    root = zarr.open_group(store, mode="r")
    ids = [str(i) for i in root[L.IDS][:]]
    victim = 5  # shard 2
    old_boxes = root[L.BOXES][victim]
    _replace(data / ids[victim], seed=1)
    verify_store(store)  # the store itself is sound
    with pytest.raises(DatasetError, match=f"image '.*{ids[victim]}' is not the image the store's targets were"):
        verify_store(store, images=data)

    reader = CacheReader(store)
    with pytest.raises(DatasetError, match=f"image '.*{ids[victim]}' is not the image the store's targets were"):
        reader.check_images(np.arange(N))
    with pytest.raises(DatasetError, match=rf"{ids[victim]}' \(sample {victim}\) is not the image its targets"):
        reader.dataset(resolution=32).crops([(victim, 0)])
    assert reader.dataset(resolution=32).crops([(victim - 2, 0)]).shape == (1, 32, 32, 3)  # the others read

    report = build_cache(load_cache_config(data=data, out=store, **SMALL_STORE), progress=False)
    assert report["complete"] and report["shards_run"] == 1 and report["images_run"] == S
    assert "warning: 1 images changed since they were cached" in capfd.readouterr().err
    root = zarr.open_group(store, mode="r")
    new = (data / ids[victim]).read_bytes()
    assert root[L.SOURCES][victim].tolist()[::2] == [len(new), digest(new)]
    assert not np.array_equal(root[L.BOXES][victim], old_boxes)  # 80x64 now: the views were drawn again
    verify_store(store, images=data)
    CacheReader(store).check_images(np.arange(N))

    # a copy with new mtimes but the same bytes is the same dataset: nothing is redone
    for p in data.rglob("*.jpg"):
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert build_cache(load_cache_config(data=data, out=store, **SMALL_STORE), progress=False)["shards_run"] == 0


def test_images_of_another_dataset_with_the_same_names_are_refused(small_store, tmp_path):
    other = make_sample_dataset(tmp_path / "other", images=N, size=64, seed=1)  # same names, other pictures
    with pytest.raises(DatasetError, match="is not the image the store's targets were computed from"):
        CacheReader(small_store, images=other).check_images(np.arange(N))
    with pytest.raises(DatasetError, match="is not the image the store's targets were computed from"):
        verify_store(small_store, images=other)


@pytest.mark.parametrize("array", [L.IDS, L.LABELS, L.BOXES, L.ERRORS, L.SOURCES])
def test_a_lost_sample_array_chunk_fails_verify_and_training(store_copy, array):
    """Training meets the loss where it reads the array: the loader (ids, boxes, sources) when it first meets the
    shard, evaluation's labels; nothing but `info` and `verify` reads the errors."""
    _file(store_copy, array, 1).unlink()
    message = f"{array}: shard 1 \\(samples 2-3\\) is done but its file is gone"
    with pytest.raises(CacheIntegrityError, match=message):
        verify_store(store_copy)
    reader = CacheReader(store_copy)
    row = int(next(i for i in reader.indices(holdout=0.0) if i // reader.shard_size == 1))
    if array == L.LABELS:
        with pytest.raises(CacheIntegrityError, match=f"^{array}: a file of it is gone .*--repair"):
            reader.labels[[0, row]]
    elif array != L.ERRORS:
        with pytest.raises(CacheIntegrityError, match=f"^{array}: shard 1 file is gone.*--repair"):
            reader.dataset(resolution=32)[(row, 0)]


@pytest.mark.slow
def test_a_rerun_writes_lost_sample_arrays_again(ray_session, small_config, store_copy, assert_same_store, small_store):
    for array in (L.IDS, L.LABELS, L.BOXES):
        _file(store_copy, array, 2).unlink()
    assert list(repair_store(store_copy)) == [2]  # a rerun trusts the done state: repair marks the shard not done
    report = build_cache(small_config(store_copy), progress=False)
    assert report["shards_run"] == 1
    assert_same_store(store_copy, small_store)


@pytest.mark.parametrize("array", [L.norm_array("clip", "spatial", "cov"), L.norm_array("dinov2", "summary", "mean")])
def test_a_lost_or_replaced_norm_array_fails_verify_and_training(store_copy, array):
    chunk = store_copy / array / "c" / "0" / "0" if array.endswith("cov") else store_copy / array / "c" / "0"
    saved = chunk.read_bytes()
    chunk.unlink()
    for check in (verify_store, CacheReader):
        with pytest.raises(CacheIntegrityError, match=f"{array} is gone"):
            check(store_copy)
    chunk.write_bytes(saved)
    root = zarr.open_group(store_copy, mode="r+")
    values = root[array][...]
    values.flat[0] += 1  # other values of the right shape, as a stray copy from another store would be
    root[array][...] = values
    for check in (verify_store, CacheReader):
        with pytest.raises(CacheIntegrityError, match=f"{array} holds other values than were written"):
            check(store_copy)


@pytest.mark.parametrize("array", [L.target_array("clip", "spatial"), L.scale_array("dinov2", "spatial")])
def test_two_swapped_shard_files_fail_verify_and_training(store_copy, array):
    a, b = _file(store_copy, array, 1), _file(store_copy, array, 2)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert data_a != data_b
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(CacheIntegrityError, match=f"{array}: shard 1 .*(swapped|replaced)"):
        verify_store(store_copy)
    if len(data_a) != len(data_b):  # the loader compares sizes when it first meets a shard; verify reads the values
        reader = CacheReader(store_copy)
        row = int(next(i for i in reader.indices(holdout=0.0) if i // reader.shard_size == 1))
        with pytest.raises(CacheIntegrityError, match=f"^{array}: shard 1 file is .* bytes"):
            reader.dataset(resolution=32)[(row, 0)]


def test_swapped_sample_array_files_of_one_size_fail_verify(store_copy):
    root = zarr.open_group(store_copy, mode="r+")
    a, b = _file(store_copy, L.LABELS, 0), _file(store_copy, L.LABELS, 3)  # labels 0, 0 and 3, 3: same size
    assert root[L.LABELS][0] != root[L.LABELS][6] and a.stat().st_size == b.stat().st_size
    data_a = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data_a)
    with pytest.raises(CacheIntegrityError, match=f"{L.LABELS}: shard 0 holds other values than its build wrote"):
        verify_store(store_copy)
