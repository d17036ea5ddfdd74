"""Build settings: a TOML file and command-line values become one CacheConfig; mistakes name the key."""

from pathlib import Path

import pytest

from radio_distill.cache.config import Storage
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
    ('data = "d"\nout = "o"\nviews = "2"\n', "config '.*cache.toml': 'views' must be a whole number, got \"2\""),
    ('data = "d"\nout = "o"\nshard_size = 1.5\n', "'shard_size' must be a whole number, got 1.5"),
])
def test_config_mistakes_name_the_key(tmp_path, text, culprit):
    (tmp_path / "cache.toml").write_text(text)
    with pytest.raises(RadioDistillError, match=culprit):
        load_cache_config(tmp_path / "cache.toml")


def test_missing_config_file(tmp_path):
    with pytest.raises(RadioDistillError, match="config '.*nope.toml'"):
        load_cache_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("text, culprit", [
    # a string is truthy: `overwrite = "false"` deleted and rebuilt a complete store
    ('overwrite = "false"', "'overwrite' must be true or false, got \"false\""),
    ("overwrite = 0", "'overwrite' must be true or false, got 0"),
    ('data = 5', "'data' must be a path (a string), got 5"),
    ('out = ["o"]', "'out' must be a string, got [\"o\"]"),
    ("teachers = 5", "'teachers' must be a string or an array of strings or tables, got 5"),
    ('[[teachers]]\nspec = "sam:tiny"\npool = "abc"', "'teachers[0].pool' must be a whole number, got \"abc\""),
    ('[[teachers]]\nspec = "sam:tiny"\npool = 2.7', "'teachers[0].pool' must be a whole number, got 2.7"),  # was 2
    ('[[teachers]]\nspec = 5', "'teachers[0].spec' must be a string, got 5"),
    ('[[teachers]]\nspec = "sam:tiny"\nfidelity = "high"', "'teachers[0].fidelity' must be a number"),
    ('fidelity = true\nteachers = "tiny"', "'fidelity' must be a number, got true"),
    ('address = 6379', "'address' must be a string, got 6379"),
])
def test_toml_values_of_the_wrong_type_name_the_key_and_the_file(tmp_path, text, culprit):
    toml = tmp_path / "cache.toml"
    toml.write_text("\n".join([*(f'{key} = "{key[0]}"' for key in ("data", "out") if not text.startswith(key)), text]))
    with pytest.raises(RadioDistillError) as e:
        load_cache_config(toml, teachers=None if "teachers" in text else "tiny")
    assert str(e.value).startswith(f"config '{toml}': {culprit}")


def test_toml_values_become_what_the_config_holds(tmp_path):
    toml = tmp_path / "cache.toml"
    toml.write_text('data = "d"\nout = "o"\noverwrite = true\n'
                    'teachers = ["sam:tiny", {spec = "clip:radio-tiny-clip", pool = 2}]\n')
    cfg = load_cache_config(toml)
    assert cfg.overwrite is True and cfg.data == Path("d") and cfg.storage["clip"].pool == 2
