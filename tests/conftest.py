"""Fixtures shared by every test folder: one Ray session, a generated dataset and a tiny store built from it.

Ray starts once per session (5-10 s); `build_cache` reuses an initialised Ray. Everything lives in
pytest's temporary folders; the tiny teachers have seeded random weights, so nothing is downloaded.
"""

from pathlib import Path

import pytest

from radio_distill.cache.build import CacheConfig, build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset

SAMPLE_IMAGES = 48  # labelled scenes; `write_bad_files` adds 10 odd files, 3 of them unreadable
TINY_STORE = dict(teachers="tiny", views=2, shard_size=4, workers=2)  # 58 samples -> 15 shards


@pytest.fixture(scope="session")
def ray_session():
    """Ray on 2 CPUs, started once (or the one already running). Worker logs stay out of the captured
    output (CLI tests read it); worker errors still reach the tests as exceptions."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """Image folder: 48 labelled 96 px JPEGs in 4 class subfolders (masks in ../masks), plus at the top
    level the bad files of `write_bad_files` (huge 12000x9000 JPEG included): empty.jpg, truncated.jpg
    and text.jpg are unreadable, the other 7 load as RGB."""
    return make_sample_dataset(tmp_path_factory.mktemp("sample"), images=SAMPLE_IMAGES, bad=True, huge=True)


@pytest.fixture(scope="session")
def tiny_config(sample_dataset):
    """`tiny_config(out, **overrides)`: the CacheConfig of `tiny_store` (tiny teachers, 2 views, shards of 4)."""

    def make(out: Path, **overrides) -> CacheConfig:
        return load_cache_config(data=sample_dataset, out=out, **{**TINY_STORE, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_store(ray_session, tiny_config, tmp_path_factory) -> Path:
    """A complete store of `sample_dataset` by the three tiny teachers. Read-only: copy it to damage it."""
    out = tmp_path_factory.mktemp("tiny_store") / "cache.zarr"
    report = build_cache(tiny_config(out), progress=False)
    assert report["complete"], report
    return out
