"""A tiny store shared by the training tests: 40 generated images (+ bad files), 2 views, tiny teachers."""

import shutil

import pytest

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.train.config import TrainConfig


@pytest.fixture(scope="session")
def train_store(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("train_data")
    images = make_sample_dataset(root / "data", images=40, size=64, bad=True)
    cfg = CacheConfig(data=images, out=root / "cache.zarr", teachers=tuple(tiny_teachers()), views=2,
                      shard_size=8, workers=2)
    build_cache(cfg, progress=False)
    return cfg.out


@pytest.fixture
def store_copy(train_store, tmp_path):
    """A private copy of the store, for tests that damage it."""
    dst = tmp_path / "copy.zarr"
    shutil.copytree(train_store, dst)
    return dst


def config(store, out, **kw) -> TrainConfig:
    """Small, fast CPU settings; tests override what they exercise."""
    values = dict(store=store, out=out, student="test_vit", steps=6, batch_size=8, resolution=32, lr=2e-3,
                  workers=0, log_every=1, checkpoint_every=1000, device="cpu", holdout=0.1)
    values.update(kw)
    return TrainConfig(**values)
