"""Faults inside the Ray job: a shard that fails is reported in one line and the others go on; an
actor that cannot start is reported, not waited on forever; a superseded build's worker writes nothing."""

import shutil
import threading
import time

import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_distill.cache import build
from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache, shard_samples
from radio_distill.cache.worker import ShardWorker
from radio_distill.cache.config import load_cache_config
from radio_distill.store.group import commit_shards
from radio_distill.store.lock import build_lock
from radio_distill.store.sources import scan_source
from radio_distill.cli import cache_app
from radio_distill.errors import CacheLayoutError, RadioDistillError

NAMES = ("clip", "dinov2", "sam")


@pytest.mark.slow
def test_a_failing_shard_is_reported_and_the_others_go_on(ray_session, small_dataset, small_store, tmp_path,
                                                          assert_same_store):
    out = shutil.copytree(small_store, tmp_path / "cache.zarr")
    root = zarr.open_group(out, mode="r+")
    for name in NAMES:  # shards 1 and 2 still to do, as after a stopped build
        root[L.done_array(name)][1:3] = 0
    # a file where shard 2's folder must go: tensorstore cannot write that shard (a real ENOTDIR), the others can
    blocker = out / L.target_array("clip", "spatial") / "c" / "2"
    shutil.rmtree(blocker)
    blocker.write_text("")
    args = ["build", str(small_dataset), "--out", str(out), "--teachers", "tiny", "--views", "2", "--shard-size", "2",
            "--workers", "2"]
    result = CliRunner().invoke(cache_app, args)

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    *_, last = result.stderr.splitlines()
    assert last.startswith("error: 1 of 4 shards failed (shard 2): ValueError: ") and "Not a directory" in last, last
    assert "; fix it, then rerun: radio-cache " in last
    report = " ".join(result.stdout.split())
    assert "partial" in report and "failed: shard 2: ValueError: " in report and "source locations" not in report
    root = zarr.open_group(out, mode="r")
    for name in NAMES:
        assert root[L.done_array(name)][:].tolist() == [1, 1, 0, 1], name  # shard 1 was done beside the failing one

    blocker.unlink()  # the cause fixed, the same command completes the store, as if nothing had happened
    result = CliRunner().invoke(cache_app, args)
    assert result.exit_code == 0, result.output
    assert_same_store(out, small_store)


def test_an_actor_the_cluster_cannot_place_is_reported(ray_session, small_config, tmp_path, monkeypatch):
    import ray

    @ray.remote(num_cpus=2)
    class Hog:  # holds every CPU of the test's Ray, as another job on a shared cluster would
        def ready(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote())
    monkeypatch.setattr(build, "START_TIMEOUT", 2)
    outcome = {}

    def run():
        try:
            build_cache(small_config(tmp_path / "x.zarr", workers=1), progress=False)
        except RadioDistillError as e:
            outcome["error"] = str(e)

    try:
        thread = threading.Thread(target=run, daemon=True)
        started = time.monotonic()
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the build waits forever for an actor that cannot be placed"
    finally:
        ray.kill(hog)
    assert time.monotonic() - started < 60
    assert outcome["error"].startswith("no Ray worker started within 2 s (free in the cluster now: ")
    assert "cannot place one" in outcome["error"] and "\n" not in outcome["error"]
    assert not (tmp_path / "x.zarr" / "zarr.json").exists()


def test_a_teacher_that_fails_to_load_is_one_line(ray_session, small_dataset, tmp_path, capfd):
    weights = tmp_path / "sam_tiny.pth"
    weights.write_bytes(b"not a checkpoint")  # exists, so only loading it in the worker can fail
    cfg = load_cache_config(data=small_dataset, out=tmp_path / "x.zarr", teachers=[f"sam:tiny:{weights}"], workers=1)
    with pytest.raises(RadioDistillError) as e:
        build_cache(cfg, progress=False)
    message = str(e.value)
    assert message.startswith("no Ray worker could start: UnpicklingError: ") and "\n" not in message, message
    assert "Traceback" not in "".join(capfd.readouterr())  # Ray prints none of its own
    assert not (tmp_path / "x.zarr" / "zarr.json").exists()


def test_a_worker_of_a_build_that_lost_the_store_writes_nothing(small_dataset, small_store, tiny_specs, tmp_path,
                                                                 file_digests, assert_same_store):
    """A killed driver's workers may live on; once a rerun holds the store's lock, they must not write."""
    out = shutil.copytree(small_store, tmp_path / "cache.zarr")
    root = zarr.open_group(out, mode="r+")
    for name in NAMES:
        root[L.done_array(name)][1] = 0
    worker = ShardWorker(tuple(tiny_specs.values()), str(out), batch_size=64, threads=torch.get_num_threads())
    samples = shard_samples(scan_source(small_dataset), 1, root.attrs["shard_size"])
    with build_lock(out) as token:  # the rerun's
        before = file_digests(out)
        with pytest.raises(CacheLayoutError, match="no longer holds the lock"):
            worker.run(1, str(small_dataset), "the-killed-build", samples)
        assert file_digests(out) == before
        commit_shards(out, root, {1: worker.run(1, str(small_dataset), token, samples)})  # as the rerun's driver
    assert_same_store(out, small_store)
