"""A teacher cached at two resolutions in one store: each student side trains the closest entry, and
the pairing is printed and recorded in the run."""

import json
from dataclasses import replace

import pytest
import torch

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.student import TeacherDims, create_student, load_student
from radio_distill.train.loop import train
from radio_distill.store.reader import TeacherMeta
from radio_distill.train.step import pair_teachers

from .conftest import config


@pytest.fixture(scope="module")
def two_sides_store(tmp_path_factory, ray_session):
    """clip@64 and the tiny dinov2 twice: dinov2_lo@56 and dinov2_hi@112."""
    root = tmp_path_factory.mktemp("two_sides")
    clip, dinov2, _ = tiny_teachers()
    teachers = (clip, replace(dinov2, name="dinov2_lo", resolution=56), replace(dinov2, name="dinov2_hi", resolution=112))
    cfg = CacheConfig(data=make_sample_dataset(root / "data", images=16, size=64), out=root / "cache.zarr",
                      teachers=teachers, views=1, shard_size=8, workers=2)
    build_cache(cfg, progress=False)
    return cfg.out


def meta(name: str, model: str, resolution: int) -> TeacherMeta:
    return TeacherMeta(name, 8, 8, (4, 4), (), {}, resolution=resolution, model=model)


def test_each_side_pairs_with_the_closest_entry_of_each_model():
    teachers = [meta("clip", "c", 224), meta("lo", "d", 224), meta("hi", "d", 448), meta("siglip", "s", 384)]
    pairing = pair_teachers(teachers, (128, 224, 336, 384, 1024))
    assert pairing == {128: ["clip", "lo", "siglip"], 224: ["clip", "lo", "siglip"],
                       336: ["clip", "hi", "siglip"],  # a tie (112 each way): the higher resolution
                       384: ["clip", "hi", "siglip"], 1024: ["clip", "hi", "siglip"]}


@pytest.mark.slow
def test_a_store_with_dinov2_lo_and_hi_trains_each_at_its_side(two_sides_store, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = config(two_sides_store, run, steps=2, resolution=[48, 112], batch_size=[4, 4], resolution_policy="partition",
                 holdout=0.0)
    train(cfg, progress=False)
    assert "teachers trained per student resolution: 48: clip, dinov2_lo; 112: clip, dinov2_hi" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["pairing"] == {"48": ["clip", "dinov2_lo"],
                                                                     "112": ["clip", "dinov2_hi"]}
    low = tmp_path / "low"  # one side: dinov2_hi is never trained, its heads stay as initialised
    train(config(two_sides_store, low, steps=2, resolution=48, batch_size=4, holdout=0.0), progress=False)
    torch.manual_seed(cfg.seed)
    start = create_student("test_vit", teachers={n: TeacherDims(**d) for n, d in
                                                 json.loads((low / "run.json").read_text())["teachers"].items()})
    trained = load_student(low).state_dict()
    for name, value in start.state_dict().items():
        if "heads.dinov2_hi." in name:
            assert torch.equal(trained[name], value), name
        elif "heads.dinov2_lo." in name and name.endswith("weight"):
            assert not torch.equal(trained[name], value), name
