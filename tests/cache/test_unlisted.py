"""Tars without sidecars planned unlisted (`--tar-samples`): the driver reads each tar's first header block only,
each build worker lists its shard's tar, and the store holds the samples, ids, locations and targets the header
scan gives, with the rows past a tar's last sample ABSENT; a build stopped part way resumes to the same store."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from webdataset import TarWriter

from radio_distill.cli import cache_app
from radio_distill.errors import DatasetError
from radio_distill.store import layout as L
from radio_distill.store.sources import NO_IMAGE, UNLISTED, Images, scan_source

from .test_sidecars import write_img2dataset

PER_TAR = 8  # rows planned per tar: the tars hold 7 samples each (and the extra one 3)


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> dict:
    """img2dataset's tars without their sidecars, and a fourth tar (TarWriter) with a key that has no image."""
    root = tmp_path_factory.mktemp("unlisted")
    write_img2dataset(root / "out")
    (root / "bare").mkdir()
    for tar in sorted((root / "out").glob("*.tar")):
        shutil.copy(tar, root / "bare" / tar.name)
    with open(root / "bare" / "00003.tar", "wb") as f:
        writer = TarWriter(f)
        for i, label in enumerate((5, 1, 2)):
            data = io.BytesIO()
            Image.new("RGB", (16, 12), (i * 50, 9, 99)).save(data, "JPEG")
            sample = {"__key__": f"extra{i}", "json": json.dumps({"label": label})}
            writer.write({**sample, "jpg": data.getvalue()} if i != 1 else {**sample, "txt": "no image"})
        writer.close()
    return {"pattern": str(root / "bare" / "*.tar"), "root": root / "bare"}


@pytest.fixture
def reads(monkeypatch):
    return _count_reads(monkeypatch)


def _count_reads(monkeypatch) -> dict:
    """{'opened': paths opened by `os.open`, 'bytes': bytes read by `os.pread`, 'tarfile': tars opened by
    `tarfile.open`} in this process, from now on."""
    seen = {"opened": [], "bytes": 0, "tarfile": []}
    os_open, pread, tar_open = os.open, os.pread, tarfile.open

    def opening(path, *args, **kwargs):
        seen["opened"].append(str(path))
        return os_open(path, *args, **kwargs)

    def reading(fd, size, offset):
        data = pread(fd, size, offset)
        seen["bytes"] += len(data)
        return data

    def tar(name=None, *args, **kwargs):
        seen["tarfile"].append(str(name))
        return tar_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "pread", reading)
    monkeypatch.setattr(tarfile, "open", tar)
    return seen


def test_planning_reads_a_header_block_a_tar_and_the_worker_lists_what_the_header_scan_gives(bare, reads):
    m = scan_source(bare["pattern"], tar_samples=PER_TAR)
    assert not reads["tarfile"] and reads["bytes"] == 4 * tarfile.BLOCKSIZE
    assert sorted(Path(p).name for p in reads["opened"]) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert len(m) == 4 * PER_TAR and m.tar_samples == PER_TAR and m.classes == ()
    locations = np.asarray(m.locations)
    assert (locations[:, 1] == UNLISTED).all()
    assert locations[:, 0].tolist() == np.repeat(np.arange(4), PER_TAR).tolist()
    assert locations[:, 2].tolist() == np.tile(np.arange(PER_TAR), 4).tolist()
    assert m.fingerprint() != scan_source(bare["pattern"], tar_samples=PER_TAR + 1).fingerprint()

    headers = scan_source(bare["pattern"])  # today's scan: every header listed in the driver
    ids, labels, found, reasons, absent = Images(m.source()).unlisted(locations)
    assert absent.tolist() == ([False] * 7 + [True]) * 3 + [False] * 3 + [True] * 5
    present = np.flatnonzero(~absent)
    assert [ids[k] for k in present] == list(headers.ids) and len(headers) == 24
    assert [labels[k] for k in present] == list(headers.labels)
    np.testing.assert_array_equal(found[present], headers.locations)
    assert [reasons[k] for k in present] == [headers.reasons.get(r, "") for r in range(24)]
    assert found[25, 1] == NO_IMAGE and "has: json, txt" in reasons[25] and headers.reasons.keys() == {22}
    assert (found[absent] == locations[absent]).all() and not any(ids[k] for k in np.flatnonzero(absent))

    calibration = Images(m.source()).read([""] * 4, locations[[0, 6, 7, 25]])  # as the calibration pass reads rows
    assert calibration[:2] == Images(headers.source()).read(list(headers.ids[:1]) + [headers.ids[6]],
                                                            headers.locations[[0, 6]])
    assert "absent: tar '00000.tar' holds 7 samples" in str(calibration[2]) and "has: json, txt" in str(calibration[3])

    with pytest.raises(DatasetError, match=r"00000.tar' holds 7 samples, more than the 6 .*--tar-samples 7"):
        Images(scan_source(bare["pattern"], tar_samples=6).source()).unlisted(locations[:1])


def test_bad_unlisted_input_is_one_line_before_anything_is_created(bare, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(bare["root"], shards)
    (shards / "00001.tar").write_bytes(b"\xff\xd8 a JPEG named .tar" * 40)
    out = tmp_path / "cache.zarr"
    cases = {str(shards / "*.tar"): ("00001.tar' is not an uncompressed tar", "8"),
             bare["pattern"]: ("--tar-samples must be >= 1", "0"),
             str(tmp_path): ("is an image folder or a list file", "8")}
    sidecars = Path(str(bare["root"]).replace("bare", "out")) / "*.tar"
    cases[str(sidecars)] = ("have theirs, which give each tar's samples", "8")
    for data, (message, per_tar) in cases.items():
        result = CliRunner().invoke(cache_app, ["build", data, "--out", str(out), "--teachers", "tiny",
                                                "--tar-samples", per_tar])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert not out.exists()


@pytest.fixture(scope="module")
def unlisted(ray_session, tiny_config, bare, tmp_path_factory) -> dict:
    """The tars built unlisted in one go (shards of 4: two a tar, one view), with what the driver read meanwhile."""
    from radio_distill.cache.build import build_cache

    out = tmp_path_factory.mktemp("unlisted_store") / "cache.zarr"
    cfg = replace(tiny_config(out), data=bare["pattern"], views=1, tar_samples=PER_TAR)
    with pytest.MonkeyPatch.context() as patch:
        seen = _count_reads(patch)
        report = build_cache(cfg, progress=False)
    return {"out": out, "cfg": cfg, "report": report, "reads": seen}


def test_an_unlisted_build_stores_the_header_scans_samples_with_absent_rows(unlisted, bare):
    from radio_distill.store.group import open_store
    from radio_distill.store.inspect import store_info, verify_store
    from radio_distill.store.reader import CacheReader

    report, out = unlisted["report"], unlisted["out"]
    assert report["complete"] and report["ok"] == 23 and report["shards"] == 8 and report["failed"] == {}
    assert report["samples"] == 24 and report["absent"] == 8
    assert not unlisted["reads"]["tarfile"] and unlisted["reads"]["bytes"] == 4 * tarfile.BLOCKSIZE  # the driver's

    headers, root = scan_source(bare["pattern"]), open_store(out)
    status = root[L.STATUS][:]
    assert int((status == L.ABSENT).sum()) == 4 * PER_TAR - 24 == store_info(out)["absent"]
    rows = np.flatnonzero(status != L.ABSENT)
    assert rows.tolist() == [*range(7), *range(8, 15), *range(16, 23), 24, 25, 26]
    assert root[L.IDS][:][rows].tolist() == list(headers.ids)
    assert root[L.LABELS][:][rows].tolist() == list(headers.labels)
    np.testing.assert_array_equal(root[L.LOCATIONS][:][rows], headers.locations)
    assert root[L.ERRORS][:][rows].tolist() == [headers.reasons.get(r, "") for r in range(24)]
    assert status[rows].tolist() == [L.UNREADABLE if r == 22 else L.OK for r in range(24)]
    assert root[L.SPLIT][:][rows].tolist() == [L.split_key(i) for i in headers.ids]
    assert root.attrs["dataset"]["classes"] == list(headers.classes) == [str(c) for c in range(6)]
    absent = np.flatnonzero(status == L.ABSENT)
    assert (root[L.LOCATIONS][:][absent][:, 1] == UNLISTED).all() and not root[L.IDS][:][absent].any()
    assert verify_store(out)["ok"]
    reader = CacheReader(out)
    assert reader.num_usable == 23 and reader.absent == 8 and "1 of 24 samples" in reader.unusable_note()


@pytest.mark.slow
def test_an_unlisted_build_has_the_targets_of_the_header_scans_and_resumes_to_the_same_store(
        unlisted, tiny_config, bare, tmp_path, assert_same_store):
    from radio_distill.cache.build import build_cache
    from radio_distill.store.group import open_store
    from radio_distill.store.reader import CacheReader

    listed = tmp_path / "listed.zarr"
    report = build_cache(replace(tiny_config(listed), data=bare["pattern"], views=1), progress=False)
    assert report["complete"] and report["ok"] == 23
    a, b = open_store(listed), open_store(unlisted["out"])
    rows = np.flatnonzero(b[L.STATUS][:] != L.ABSENT)
    arrays = [L.IDS, L.LABELS, L.LOCATIONS, L.ERRORS, L.BOXES, L.SPLIT, L.SOURCES, L.STATUS]
    for array in arrays + [p for name in ("clip", "dinov2", "sam") for p in L.target_arrays(name) if p in a]:
        np.testing.assert_array_equal(b[array][:][rows], a[array][:], err_msg=array)
    ra, rb = CacheReader(listed), CacheReader(unlisted["out"])  # training holds out and draws the same samples
    assert [a[L.IDS][int(i)] for i in ra.indices(holdout=0.25)] == [b[L.IDS][int(i)] for i in rb.indices(holdout=0.25)]

    resumed = tmp_path / "resumed.zarr"  # stopped after 3 shards (the first tar and half the second), then resumed
    partial = build_cache(replace(unlisted["cfg"], out=resumed, max_shards=3), progress=False)
    assert not partial["complete"] and partial["shards_run"] == 3
    assert build_cache(replace(unlisted["cfg"], out=resumed), progress=False)["shards_run"] == 5
    assert_same_store(resumed, unlisted["out"])


@pytest.mark.slow
def test_an_unlisted_build_killed_mid_way_resumes_to_the_store_one_build_makes(unlisted, bare, tmp_path,
                                                                               assert_same_store):
    from radio_distill.cache.build import build_cache
    from radio_distill.store.group import open_array

    tars = tmp_path / "tars"  # 16 tars (the four, four times): 128 shards, so the kill lands between commits
    tars.mkdir()
    for k in range(16):
        shutil.copy(bare["root"] / f"{k % 4:05d}.tar", tars / f"{k:05d}.tar")
    one_go, killed = tmp_path / "one_go.zarr", tmp_path / "killed.zarr"
    cfg = replace(unlisted["cfg"], data=str(tars / "*.tar"), out=one_go, shard_size=1, workers=1)
    assert build_cache(cfg, progress=False)["complete"]
    code = "import sys; from radio_distill.cli import cache_app; sys.argv[0] = 'radio-cache'; cache_app()"
    build = subprocess.Popen([sys.executable, "-c", code, "build", cfg.data, "--out", str(killed), "--teachers",
                              "tiny", "--views", "1", "--shard-size", "1", "--workers", "1", "--tar-samples",
                              str(PER_TAR)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def done() -> int:
        return int(open_array(killed, L.done_array("clip")).read().result().sum()) if (killed / "zarr.json").exists() \
            else 0

    deadline = time.monotonic() + 180
    while done() == 0:
        assert build.poll() is None, build.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard done within 180 s"
        time.sleep(0.1)
    os.killpg(build.pid, signal.SIGKILL)  # the driver and the Ray it started
    build.wait()
    assert 0 < done() < 128, "the build finished before the kill"
    report = build_cache(replace(cfg, out=killed), progress=False)
    assert report["complete"] and report["failed"] == {}
    assert_same_store(killed, one_go)
