"""The Ray build: partial builds resume to the same bytes, other settings are refused before any work,
and a worker killed mid-build costs nothing but time."""

import re
import signal
import threading
import time
from dataclasses import replace

import psutil
import pytest
import zarr

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import Storage
from radio_distill.store.inspect import store_info, verify_store
from radio_distill.errors import CacheIntegrityError, CacheLayoutError, RadioDistillError

SHARDS = 15  # tests/conftest.py: 58 samples in shards of 4
GCS_STILL_S = 4.0  # seconds Ray's GCS is held still around a worker's kill (3 counted retries lasted less)


@pytest.mark.slow
def test_partial_build_resumes_to_the_uninterrupted_store(ray_session, tiny_config, tiny_store, tmp_path,
                                                          assert_same_store, file_digests, shard_worker_processes):
    out = tmp_path / "resumed.zarr"
    out.mkdir()  # an empty folder is a fresh --out
    cfg = tiny_config(out, max_shards=2)
    report = build_cache(cfg, progress=False)
    assert not report["complete"] and report["shards_run"] == 2 and report["images_run"] == 8
    info = store_info(out)
    assert info["shards_done"] == 2 and info["shards_total"] == SHARDS and info["pending"] == info["samples"] - 8
    assert all(t["shards_done"] == 2 for t in info["teachers"].values())
    assert L.norm_array("clip", "spatial", "mean") not in zarr.open_group(out, mode="r")  # only when complete
    with pytest.raises(CacheIntegrityError, match="teachers/clip/done: shard 2 is not done"):
        verify_store(out)

    # another build's settings at the same --out: refused before any work, the store untouched
    before = file_digests(out)
    workers_before = {p.pid for p in shard_worker_processes()}
    others = ((replace(cfg, views=1), "views"), (replace(cfg, teachers=cfg.teachers[:2], storage={}), "teachers"),
              (replace(cfg, storage={"sam": Storage(pool=2)}), "storage"), (replace(cfg, shard_size=8), "shard_size"))
    for other, culprit in others:
        with pytest.raises(CacheLayoutError) as e:
            build_cache(other, progress=False)
        message = str(e.value)
        assert "\n" not in message and "--overwrite" in message
        assert re.search(rf"was built with other [a-z_, ]*\b{culprit}\b", message), message
    assert file_digests(out) == before
    assert {p.pid for p in shard_worker_processes()} <= workers_before

    report = build_cache(replace(cfg, max_shards=None), progress=False)
    assert report["complete"] and report["shards_run"] == SHARDS - 2
    verify_store(out)
    assert_same_store(out, tiny_store)


def test_out_that_is_not_a_store_is_refused(tiny_config, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CacheLayoutError, match="is not a radio-distill store"):
        build_cache(tiny_config(out), progress=False)
    with pytest.raises(CacheLayoutError, match="is not a radio-distill store"):
        build_cache(tiny_config(out, overwrite=True), progress=False)  # --overwrite never deletes other folders
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_settings_are_refused_before_any_work(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path / "x.zarr", views=0)
    with pytest.raises(RadioDistillError, match="--views must be >= 1, got 0"):
        build_cache(cfg, progress=False)
    cfg = replace(tiny_config(tmp_path / "x.zarr"), storage={"clip": Storage(spatial="bf16")})
    with pytest.raises(RadioDistillError, match="teacher 'clip': unknown codec 'bf16'; choose from fp16, int8"):
        build_cache(cfg, progress=False)
    with pytest.raises(RadioDistillError, match="teacher names must be unique"):
        build_cache(replace(cfg, teachers=cfg.teachers[:1] * 2, storage={}), progress=False)
    dinov2 = replace(cfg.teachers[1], resolution=115)  # was found inside a Ray worker, after it started
    with pytest.raises(RadioDistillError, match="teacher 'dinov2': resolution 115 is not a multiple of its patch size 14"):
        build_cache(replace(cfg, teachers=(cfg.teachers[0], dinov2), storage={}), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_fidelity_is_measured_on_every_statistics_shard(tiny_store):
    root = zarr.open_group(tiny_store, mode="r")
    n, size = root.attrs["num_samples"], root.attrs["shard_size"]
    status = root[L.STATUS][:]
    ok = [int((status[L.shard_rows(k, size, n)] == L.OK).sum()) for k in L.stat_shards(SHARDS)]
    assert len(ok) == SHARDS and min(ok) > 0  # every shard feeds the statistics, and each holds images
    targets = [(name, target) for name in ("clip", "dinov2", "sam") for target in L.TARGETS
               if (name, target) != ("sam", "summary")]
    for name, target in targets:
        rows = root[L.moment_array(name, target, "fidelity")][:]
        tokens = 8 * 8 if target == "spatial" else 1  # every tiny teacher's grid is 8x8
        assert rows[:, 1].tolist() == [k * 2 * tokens for k in ok], (name, target)  # 2 views
        fidelity = root[L.teacher_group(name)].attrs["fidelity"][target]
        assert fidelity["mean_cos"] == pytest.approx(rows[:, 0].sum() / rows[:, 1].sum(), rel=1e-12)
        assert fidelity["min_cos"] == rows[:, 2].min() and fidelity["shards"] == SHARDS


@pytest.mark.slow
def test_killed_worker_still_yields_a_complete_identical_store(ray_session, tiny_config, tiny_store, tmp_path,
                                                               assert_same_store, shard_worker_processes):
    out = tmp_path / "killed.zarr"
    old = {p.pid for p in shard_worker_processes()}
    outcome = {}

    def run():
        try:
            outcome["report"] = build_cache(tiny_config(out), progress=False)
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    written = out / L.target_array("sam", "spatial") / "c"
    while True:  # wait until a shard's files are written (its done flag waits for the driver's next commit)
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no shard written in 120 s"
        if written.is_dir() and any(written.iterdir()):
            done = zarr.open_group(out, mode="r")[L.done_array("sam")][:]
            break
        time.sleep(0.02)
    workers = [p for p in shard_worker_processes() if p.pid not in old]
    assert len(workers) == 2, [p.cmdline() for p in workers]
    victim = next((p for p in workers if ".run" in " ".join(p.cmdline())), workers[0])
    assert not done.all(), "the build finished before the kill; give it more shards"
    # Ray's GCS held still while the worker dies, as on a loaded machine (CI): the driver's retries of the
    # killed shards fail fast (connection refused) until it hears of the death. Counted retries were all
    # spent so, the shards failed and the build returned incomplete (1 of 3 CI runs; 4 of 4 runs with this).
    gcs = [p for p in psutil.Process().children(recursive=True) if p.name() == "gcs_server"]  # this session's Ray
    for p in gcs:
        p.suspend()
    try:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        time.sleep(GCS_STILL_S)
    finally:
        for p in gcs:
            p.resume()

    restarted = set()  # Ray restarts the actor in a new process, which redoes the killed shards
    deadline = time.monotonic() + 180
    while thread.is_alive() and time.monotonic() < deadline:
        restarted |= {p.pid for p in shard_worker_processes()} - old - {p.pid for p in workers}
        thread.join(timeout=0.05)
    assert not thread.is_alive(), "build did not finish within 180 s of the kill"
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report["complete"] and not report["failed"] and report["shards_run"] == SHARDS, report  # in one run
    assert restarted, "no replacement worker was started"
    # a kill in a chunk write leaves Zarr's temporary <key>.<uuid>.partial: the shard's rerun deletes it
    assert not [p for p in out.rglob("*.partial")], "a temporary file of a killed write was left"
    verify_store(out)
    assert_same_store(out, tiny_store)
