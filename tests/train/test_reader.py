"""The reader against the faults of real data: a moved dataset, samples that are not ok, lost shard
files, corrupt chunks, images gone mid-run; and the split it computes for a million ids at once."""

import json
import shutil

import numpy as np
import pytest
import zarr

from radio_distill.store import layout as L
from radio_distill.errors import CacheIntegrityError, DatasetError
from radio_distill.store import reader as reader_module
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader, StepSampler, is_held_out

from .conftest import config


def first_drawn(reader: CacheReader, *, after: int, holdout: float = 0.1, batch_size: int = 8) -> tuple[int, int, int]:
    """(sample, view, step): a sample the loop (seed 0) first draws at a step >= `after`, and that draw."""
    sampler = StepSampler(reader.indices(holdout=holdout), views=reader.views, resolution=32, batch_size=batch_size,
                          seed=0, start_step=0, steps=after + 3)
    seen = set()
    for step in range(after + 3):
        for i, v in sampler.global_batch(step):
            if step >= after and i not in seen:
                return i, v, step
        seen.update(i for i, _ in sampler.global_batch(step))
    raise AssertionError("every sample is drawn early")


def test_split_of_many_ids_at_once_is_is_held_out():
    ids = [f"n{c:08d}/n{c:08d}_{k}.JPEG" for c in range(40) for k in range(50)] + ["a", "é/ü.jpg", "b.png"]
    keys = np.array([L.split_key(i) for i in ids], np.uint16)
    for fraction in (0.0, 0.05, 0.5, 0.95, 1.0):
        assert L.held_out(keys, fraction).tolist() == [is_held_out(i, fraction) for i in ids]
    assert 0.04 < L.held_out(keys, 0.05).mean() < 0.06
    assert is_held_out("a", 0.91) and not is_held_out("a", 0.909)  # crc32(b'a') = 0xE8B7BE43: key 0xE8B7 = 59575


def test_split_known_answers():
    """An id is held out when the top 16 bits of its crc32 are below round(fraction x 65536): --holdout 0 holds
    out nothing, even the id whose crc32 is 0, and 1 everything."""
    zero, a = "n00574/XhMx", 0xE8B7 / 65536  # crc32(b'n00574/XhMx') = 0; crc32(b'a') >> 16 = 0xE8B7
    assert L.split_key(zero) == 0 and L.split_key("a") == 0xE8B7
    assert not is_held_out(zero, 0.0) and not is_held_out(zero, 0.4 / 65536) and is_held_out(zero, 1 / 65536)
    assert not is_held_out("a", a) and is_held_out("a", a + 1 / 65536)
    assert is_held_out("a", 1.0) and is_held_out(zero, 1.0)


def test_the_store_records_the_split_key_of_every_id(store_copy):
    """The split is read from `samples/split`, written at creation: it must be the ids' own keys."""
    root = zarr.open_group(store_copy, mode="r")
    ids = root[L.IDS][:].tolist()
    assert root[L.SPLIT][:].tolist() == [L.split_key(i) for i in ids]
    reader = CacheReader(store_copy)
    held = reader.indices(holdout=0.3, split="holdout")
    assert set(held.tolist()) == {k for k in reader.indices(holdout=0.0).tolist() if is_held_out(ids[k], 0.3)}


def test_images_option_points_the_store_at_a_moved_dataset(store_copy, tmp_path):
    images = CacheReader(store_copy).root_dir
    root = zarr.open_group(store_copy, mode="r+")
    root.attrs["dataset"] = {**root.attrs["dataset"], "root": str(tmp_path / "gone")}
    with pytest.raises(DatasetError, match="images root .*gone.* is missing.*--images"):
        train(config(store_copy, tmp_path / "a"), progress=False)
    reader = CacheReader(store_copy, images=images)
    i = int(reader.indices(holdout=0.0)[0])
    assert reader.root_dir == images and reader.dataset(resolution=32).crop(i, 1).shape == (32, 32, 3)
    assert train(config(store_copy, tmp_path / "b", images=images, steps=2), progress=False)["step"] == 2


def test_fewer_than_all_samples_ok_is_said_at_the_start(train_store, tmp_path, capfd):
    status = zarr.open_group(train_store, mode="r")[L.STATUS][:]
    bad, n = int((status != L.OK).sum()), len(status)
    assert bad == 3  # the empty, truncated and text files of the generated dataset
    train(config(train_store, tmp_path / "run", steps=1), progress=False)
    assert f"warning: {bad} of {n} samples ({bad / n:.1%})" in capfd.readouterr().err


def test_a_done_shard_whose_file_is_gone_is_refused_when_met(store_copy):
    """Opening lists no file (its cost would grow with the store); the loader finds the file gone when it first
    meets the shard, and names it, before reading a value."""
    array = L.target_array("clip", "spatial")
    root = zarr.open_group(store_copy, mode="r")
    (store_copy / array / root[array].metadata.encode_chunk_key((1, 0, 0, 0, 0))).unlink()
    reader = CacheReader(store_copy)
    size, usable = reader.shard_size, np.asarray(reader.indices(holdout=0.0))
    dataset = reader.dataset(resolution=32)
    assert dataset[(int(usable[0]), 0)]["pixels"].shape == (3, 32, 32)  # shard 0 is whole
    in_shard_1 = int(usable[(usable >= size) & (usable < 2 * size)][0])
    with pytest.raises(CacheIntegrityError, match=rf"^{array}: shard 1 file is gone.*verify .* --repair"):
        dataset[(in_shard_1, 0)]


@pytest.mark.parametrize("array", [L.scale_array("clip", "spatial"), L.target_array("dinov2", "summary")])
def test_targets_that_read_as_fill_values_are_refused_naming_array_and_sample(store_copy, array, record_again):
    reader = CacheReader(store_copy)
    i = int(reader.indices(holdout=0.0)[5])
    stored = zarr.open_group(store_copy, mode="r+")[array]
    stored[i, 1] = np.zeros(stored.shape[2:], stored.dtype)  # as a lost chunk reads
    record_again(store_copy, array)  # as if written so: the file checks pass, the read finds the zeros
    dataset = reader.dataset(resolution=32)
    assert dataset[(i, 0)]["pixels"].shape == (3, 32, 32)
    with pytest.raises(CacheIntegrityError, match=rf"^{array}: sample '{reader.ids[i]}' \(row {i}, view 1\) "
                                                  "reads as all zeros"):
        dataset[(i, 1)]


def test_corrupt_chunk_is_named_by_array_and_sample(store_copy):
    array = L.target_array("clip", "spatial")
    shard_file = store_copy / array / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 32] = bytes(b ^ 0xFF for b in data[mid:mid + 32])
    shard_file.write_bytes(bytes(data))
    reader = CacheReader(store_copy)
    dataset = reader.dataset(resolution=32)
    usable = set(reader.indices(holdout=0.0).tolist())
    shard = [(i, v) for i in range(8, 16) if i in usable for v in range(2)]
    with pytest.raises(CacheIntegrityError) as e:
        dataset.__getitems__(shard)
    message = str(e.value)
    assert message.startswith(f"{array}: sample '") and "fails to decode" in message and "\n" not in message
    assert message.split("'")[1] in [reader.ids[i] for i in range(8, 16)]


def test_a_corrupt_sample_array_chunk_is_named_by_train_and_eval(store_copy, tmp_path):
    """A flipped byte in samples/labels was a ValueError traceback (a digest or ZSTD error) from both."""
    from radio_distill.evaluate import EvalConfig, evaluate

    run = tmp_path / "run"
    train(config(store_copy, run, steps=1), progress=False)
    for array in (L.IDS, L.LABELS):  # read with zarr, with tensorstore
        chunk = store_copy / array / "c" / "1"
        original = chunk.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0xFF
        chunk.write_bytes(bytes(flipped))
        CacheReader(store_copy)  # reads neither: training reads ids where it reads images, evaluation labels
        makers = [lambda: evaluate(EvalConfig(store=store_copy, run=run, out=tmp_path / "eval"), progress=False)]
        makers += [lambda: train(config(store_copy, tmp_path / "new"), progress=False)] if array == L.IDS else []
        for make in makers:
            with pytest.raises(CacheIntegrityError) as e:
                make()
            message = str(e.value)
            assert message.startswith(f"{array}: a chunk fails to decode (") and "\n" not in message
            assert f"run `radio-cache verify {store_copy} --repair`" in message
        chunk.write_bytes(original)
    assert not (tmp_path / "new").exists() and not (tmp_path / "eval").exists()


def test_a_batch_that_cannot_be_read_stops_training_in_one_line_after_a_checkpoint(store_copy, tmp_path, record_again):
    """Seen through a spawned loader worker: the worker's traceback is reduced to its one line."""
    reader = CacheReader(store_copy)
    i, v, step = first_drawn(reader, after=2)
    array = L.scale_array("clip", "spatial")
    stored = zarr.open_group(store_copy, mode="r+")[array]
    stored[i, v] = np.zeros(stored.shape[2:], stored.dtype)
    record_again(store_copy, array)  # as if written so: the open's checks pass, the read finds the zeros
    run = tmp_path / "run"
    with pytest.raises(CacheIntegrityError) as e:
        train(config(store_copy, run, steps=step + 2, workers=1), progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{array}: sample '{reader.ids[i]}' (row {i}, view {v})")
    assert message.endswith(f"the checkpoint in '{run / 'checkpoint'}' holds step {step}: continue with --resume "
                            "once the store is repaired")
    assert json.loads((run / "checkpoint/state.json").read_text())["step"] == step


def test_an_image_gone_after_the_start_is_named_when_read(store_copy, tmp_path, monkeypatch):
    """Only a sample of the files is looked at before training; one missing later is named when read."""
    images = tmp_path / "images"
    shutil.copytree(CacheReader(store_copy).root_dir, images)
    reader = CacheReader(store_copy, images=images)
    i, _, step = first_drawn(reader, after=2)
    (images / reader.ids[i]).unlink()
    monkeypatch.setattr(reader_module, "IMAGE_CHECKS", 0)
    run = tmp_path / "run"
    with pytest.raises(DatasetError, match=rf"^image '{images / reader.ids[i]}' \(sample {i}\) became unreadable: "
                                           rf"missing file; the checkpoint .* holds step {step}: continue"):
        train(config(store_copy, run, images=images, steps=step + 2), progress=False)
    assert json.loads((run / "checkpoint/state.json").read_text())["step"] == step
