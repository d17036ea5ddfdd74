"""Fixtures of the cache tests: built tiny teachers, their weights as files, a CLI-built store, store readers."""

import hashlib
import re
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from safetensors.torch import save_file
from typer.testing import CliRunner

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import build_teacher, tiny_teachers
from radio_distill.cli import cache_app

SMALL_STORE = dict(teachers="tiny", views=2, shard_size=2, workers=2)  # 8 images -> 4 shards


@pytest.fixture(scope="session")
def tiny_specs() -> dict:
    return {s.name: s for s in tiny_teachers()}


@pytest.fixture(scope="session")
def teachers(tiny_specs) -> dict:
    """The tiny teachers, built in this process as the Ray workers build them."""
    return {name: build_teacher(spec) for name, spec in tiny_specs.items()}


def _perturbed(spec):
    """A tiny teacher whose weights are moved off the seeded init, so a silent random init shows."""
    teacher = build_teacher(spec)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return teacher


@pytest.fixture(scope="session")
def weight_files(tiny_specs, tmp_path_factory) -> dict:
    """{label: (spec, file, perturbed teacher)}: tiny weights saved the way users have them."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for label, name, file in (("clip", "clip", "clip.pt"), ("dinov2-safetensors", "dinov2", "dinov2.safetensors"),
                              ("dinov2-pth", "dinov2", "dinov2.pth"), ("sam", "sam", "sam.pth")):
        spec = tiny_specs[name]
        teacher = _perturbed(spec)
        path = folder / file
        state = teacher.model.state_dict()
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, path)
        else:
            torch.save(state, path)
        out[label] = (spec, path, teacher)
    return out


@pytest.fixture(scope="session")
def cli_store(ray_session, sample_dataset, tmp_path_factory):
    """The same build as `tiny_store`, run by `radio-cache build` into another folder: (path, CliRunner result)."""
    out = tmp_path_factory.mktemp("cli_store") / "cli.zarr"
    result = CliRunner().invoke(cache_app, ["build", str(sample_dataset), "--out", str(out), "--teachers", "tiny",
                                            "--views", "2", "--shard-size", "4", "--workers", "2"])
    return out, result


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """8 labelled 64 px JPEGs in 4 class subfolders, no bad files: for tests that build several times."""
    return make_sample_dataset(tmp_path_factory.mktemp("small"), images=8, size=64)


@pytest.fixture(scope="session")
def small_config(small_dataset):
    """`small_config(out, **overrides)`: the CacheConfig of `small_store` (tiny teachers, 2 views, 4 shards of 2)."""

    def make(out: Path, **overrides):
        return load_cache_config(data=small_dataset, out=out, **{**SMALL_STORE, **overrides})

    return make


@pytest.fixture(scope="session")
def small_store(ray_session, small_config, tmp_path_factory) -> Path:
    """A complete store of `small_dataset`, built in one go. Read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("small_store") / "cache.zarr"
    report = build_cache(small_config(out), progress=False)
    assert report["complete"] and report["ok"] == 8, report
    return out


@pytest.fixture(scope="session")
def read_arrays():
    """`read_arrays(store)` -> {array path: values} of every array in a store."""

    def read(path: Path) -> dict:
        members = zarr.open_group(path, mode="r").members(max_depth=None)
        return {name: node[...] for name, node in members if isinstance(node, zarr.Array)}

    return read


@pytest.fixture(scope="session")
def assert_same_store(read_arrays):
    """`assert_same_store(a, b)`: same arrays with equal values, then the same bytes in every file."""

    def check(a: Path, b: Path) -> None:
        xa, xb = read_arrays(a), read_arrays(b)
        assert sorted(xa) == sorted(xb)
        for name in xa:
            assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name
        assert _file_digests(a) == _file_digests(b)

    return check


def _file_digests(path: Path) -> dict:
    """sha256 of every file of the store, but the temporary file of a write that a kill interrupted: zarr writes
    a chunk to `<key>.<uuid>.partial` and renames it, and nothing reads such a name (the chunk is written again)."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not re.search(r"\.[0-9a-f]{32}\.partial$", p.name)}


@pytest.fixture(scope="session")
def file_digests():
    return _file_digests


@pytest.fixture(scope="session")
def shard_worker_processes():
    """`shard_worker_processes()` -> live ShardWorker actor processes of this test session's Ray."""

    def find() -> list[psutil.Process]:
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "ShardWorker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    return find
