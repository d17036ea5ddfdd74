"""Build settings: a TOML file and command-line values become one CacheConfig; mistakes name the key."""

from pathlib import Path

import pytest

from radio_distill.cache.build import Storage
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.errors import RadioDistillError

TOML = """
data = "images/"
out = "cache.zarr"
views = 4
shard_size = 128
[[teachers]]
spec = "clip:ViT-L-14:openai@224"
summary = "int8"
[[teachers]]
spec = "sam:vit_h:/weights/sam_vit_h_4b8939.pth@1024"
pool = 2
sam_spatial = "preneck"
"""


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "cache.toml"
    path.write_text(TOML)
    return path


def test_toml_becomes_a_config(config_file):
    cfg = load_cache_config(config_file)
    assert (cfg.data, cfg.out, cfg.views, cfg.shard_size, cfg.seed) == (Path("images"), Path("cache.zarr"), 4, 128, 0)
    clip, sam = cfg.teachers
    assert (clip.name, clip.model, clip.weights, clip.resolution) == ("clip", "ViT-L-14", "openai", 224)
    assert (sam.name, sam.weights, sam.sam_spatial) == ("sam", "/weights/sam_vit_h_4b8939.pth", "preneck")
    assert cfg.storage == {"clip": Storage(spatial="int8", summary="int8", pool=1),
                           "sam": Storage(spatial="int8", summary="fp16", pool=2)}


def test_command_line_wins(config_file):
    cfg = load_cache_config(config_file, views=1, out="other.zarr", spatial_codec="fp16", pools={"clip": 2},
                            shard_size=None)
    assert cfg.views == 1 and cfg.out == Path("other.zarr") and cfg.shard_size == 128
    assert cfg.storage["clip"] == Storage(spatial="fp16", summary="int8", pool=2)
    cfg = load_cache_config(config_file, teachers=["dinov2:vit_small_patch14_dinov2.lvd142m@224"])
    assert [t.name for t in cfg.teachers] == ["dinov2"] and list(cfg.storage) == ["dinov2"]


def test_tiny_preset_with_command_line_storage(tmp_path):
    (tmp_path / "tiny.toml").write_text('data = "d"\nout = "o.zarr"\nteachers = "tiny"\n')
    cfg = load_cache_config(tmp_path / "tiny.toml", pools={"sam": 2}, spatial_codec="fp16", sam_spatial="preneck")
    assert cfg.teachers == tuple(t if t.family != "sam" else _preneck(t) for t in tiny_teachers())
    assert cfg.storage["sam"] == Storage(spatial="fp16", pool=2) and cfg.storage["clip"] == Storage(spatial="fp16")


def _preneck(spec):
    from dataclasses import replace
    return replace(spec, sam_spatial="preneck")


@pytest.mark.parametrize("text, culprit", [
    ('data = "d"\nout = "o"\nviewz = 2\n', r"unknown keys \['viewz'\]"),
    ('data = "d"\nout = "o"\n[[teachers]]\nspatial = "fp16"\n', "needs 'spec'"),
    ('data = "d"\nout = "o"\n[[teachers]]\nspec = "clip:ViT-B-16:openai"\ncodec = "fp16"\n', "needs 'spec', may have"),
    ('data = "d"\n', "missing 'out'"),
    ('data = "d\n', "config '.*cache.toml'"),
    ('data = "d"\nout = "o"\n[[teachers]]\nspec = "clip"\n', "bad teacher spec 'clip'"),
    ('data = "d"\nout = "o"\nteachers = "small"\n', "unknown preset 'small'; choose from: tiny"),
    ('data = "d"\nout = "o"\nviews = "2"\n', "'views' must be an integer, got '2'"),
    ('data = "d"\nout = "o"\nshard_size = 1.5\n', "'shard_size' must be an integer, got 1.5"),
])
def test_config_mistakes_name_the_key(tmp_path, text, culprit):
    (tmp_path / "cache.toml").write_text(text)
    with pytest.raises(RadioDistillError, match=culprit):
        load_cache_config(tmp_path / "cache.toml")


def test_missing_config_file(tmp_path):
    with pytest.raises(RadioDistillError, match="config '.*nope.toml'"):
        load_cache_config(tmp_path / "nope.toml")
