"""Creating a store is all or nothing: a kill or a full disk never leaves a store that looks whole, every
command names a half-created store in one line, and a rerun of the same build gets past the leftovers."""

import errno
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.store.dataset import Manifest
from radio_distill.store.inspect import store_info, verify_store
from radio_distill.store.lock import build_lock
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.store.group import create_store, open_store
from radio_distill.store.layout import TeacherInfo
from radio_distill.cli import cache_app
from radio_distill.errors import CacheLayoutError, RadioDistillError

MANIFEST = Manifest(root=Path("/data"), ids=tuple(f"{k}.jpg" for k in range(6)), labels=(-1,) * 6, classes=())
INFOS = {"t": TeacherInfo(resolution=16, mean=(0, 0, 0), std=(1, 1, 1), grid=(2, 2), summary_dim=4, spatial_dim=3)}
SETTINGS = {"teachers": {"t": {}}, "storage": {"t": {"spatial": "int8", "summary": "fp16", "pool": 1}}, "pixels": 8,
            "views": 2, "seed": 0, "shard_size": 4}


def _create(out):
    with build_lock(out):
        return create_store(out, manifest=MANIFEST, settings=SETTINGS, infos=INFOS)


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _every_command_says(path, pattern, tiny_config=None) -> None:
    """open_store, info, verify (library and CLI) and the build itself refuse `path` with one line matching."""
    for call in (open_store, store_info, verify_store):
        with pytest.raises(CacheLayoutError, match=pattern) as e:
            call(path)
        assert "\n" not in str(e.value)
    for command in ("info", "verify"):
        line = _one_line(CliRunner().invoke(cache_app, [command, str(path)]))
        assert re.search(pattern, line), line
    if tiny_config is not None:
        with pytest.raises(CacheLayoutError, match=pattern):
            build_cache(tiny_config(path), progress=False)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    return shutil.copytree(tiny_store, tmp_path / "copy.zarr")


@pytest.mark.parametrize("damage", ["teacher metadata", "target array", "root metadata cut short"])
def test_every_command_names_a_half_created_store(store_copy, tiny_config, damage):
    """What a kill within a second of zarr.json appearing left (before creation was atomic)."""
    if damage == "teacher metadata":
        (store_copy / L.teacher_group("clip") / "zarr.json").unlink()
        pattern = r"is half-created or damaged: teachers/clip is missing; rebuild it with .*--overwrite"
    elif damage == "target array":
        shutil.rmtree(store_copy / L.target_array("sam", "spatial"))
        pattern = r"is half-created or damaged: teachers/sam/spatial is missing; rebuild it with .*--overwrite"
    else:
        meta = store_copy / "zarr.json"
        meta.write_text(meta.read_text()[:200])
        pattern = r"is half-created \(JSONDecodeError reading zarr.json\); rebuild it with .*--overwrite"
    _every_command_says(store_copy, pattern, tiny_config)


def test_a_store_still_being_created_is_named_as_such(tmp_path):
    out = tmp_path / "creating.zarr"
    with build_lock(out):  # a build that is loading its teachers, or was killed there
        _every_command_says(out, r"is not created yet: a build is creating it or was stopped while creating it; "
                                 r"rerun the same `radio-cache build` command")


def test_disk_full_while_creating_leaves_no_store(tmp_path, monkeypatch, file_digests):
    out = tmp_path / "full.zarr"
    create_array = zarr.Group.create_array
    calls = []

    def fill_up(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 7:  # halfway through the arrays
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return create_array(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", fill_up)
    with pytest.raises(RadioDistillError, match=rf"^cannot create store '{out}': No space left on device; "
                                                r"nothing was left there$"):
        _create(out)
    assert sorted(p.name for p in out.iterdir()) == [L.LOCK_FILE]  # no zarr.json, no leftovers
    with pytest.raises(CacheLayoutError, match="is not created yet"):
        open_store(out)

    monkeypatch.undo()
    _create(out)  # the rerun creates it
    before = file_digests(out)
    monkeypatch.setattr(zarr.Group, "create_array", fill_up)
    calls.clear()
    with pytest.raises(RadioDistillError, match="No space left on device"):
        _create(out)  # an --overwrite that runs out of disk keeps the old store whole
    assert file_digests(out) == before
    open_store(out)


def test_create_replaces_a_store_and_clears_a_killed_creation(tmp_path):
    out = tmp_path / "again.zarr"
    root = _create(out)
    root[L.done_array("t")][0] = 1
    (out / L.STAGING / "samples").mkdir(parents=True)  # a creation killed halfway
    (out / L.STAGING / "zarr.json").write_text("{")
    root = _create(out)
    assert sorted(p.name for p in out.iterdir()) == [L.LOCK_FILE, "samples", "teachers", "zarr.json"]
    assert (root[L.done_array("t")][:] == 0).all() and root.attrs["num_samples"] == 6


def test_a_half_created_folder_holding_other_files_is_refused_and_kept(tmp_path):
    data = make_sample_dataset(tmp_path / "data", images=1, size=32)
    out = tmp_path / "folder"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "photo.jpg").write_text("mine")
    (out / "important.txt").write_text("keep me")
    (out / L.LOCK_FILE).touch()  # a stray lock: it was no reason to take the folder over
    line = _one_line(CliRunner().invoke(cache_app, ["build", str(data), "--out", str(out), "--teachers", "tiny"]))
    assert line == (f"error: '{out}' is not a radio-distill store and not empty (it holds 'important.txt'); "
                    "give another --out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        L.LOCK_FILE, "important.txt", "sub", "sub/photo.jpg"]


def test_only_our_own_files_make_a_half_created_store_and_overwrite_deletes_only_them(tmp_path):
    out = tmp_path / "ours.zarr"
    (out / L.STAGING / "samples").mkdir(parents=True)
    (out / "teachers").mkdir()
    (out / L.LOCK_FILE).touch()
    (out / f"{L.HOLDER_FILE}.{'f' * 32}").write_text("{")  # a lock record a kill left half replaced
    _create(out)  # taken: nothing here is not ours
    (out / "notes.txt").write_text("keep me")  # beside a whole store: an --overwrite replaces the store only
    _create(out)
    assert (out / "notes.txt").read_text() == "keep me" and open_store(out).attrs["num_samples"] == 6


@pytest.mark.slow
def test_rerun_of_the_build_gets_past_a_killed_creation(ray_session, tiny_config, tmp_path, capfd):
    data = make_sample_dataset(tmp_path / "data", images=4)
    out = tmp_path / "killed.zarr"
    (out / L.STAGING / "teachers").mkdir(parents=True)  # killed while creating, and while moving the store in
    (out / "samples").mkdir()
    (out / L.LOCK_FILE).touch()
    (out / L.HOLDER_FILE).write_text(json.dumps({"host": "gone-host", "pid": 1, "started": "then", "token": "f" * 32}))
    report = build_cache(replace(tiny_config(out), data=data, workers=1), progress=False)
    assert report["complete"] and report["samples"] == 4
    assert "taking over the lock of a build that is gone (host gone-host, pid 1" in capfd.readouterr().err
    verify_store(out)
    assert sorted(p.name for p in out.iterdir()) == [L.LOCK_FILE, "samples", "teachers", "zarr.json"]
