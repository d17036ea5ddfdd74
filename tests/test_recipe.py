"""The C-RADIOv4 recipe (`recipes/c-radiov4/`): its settings are the published ones, and it runs end to end —
build, train, evaluate — with tiny stand-ins of its teachers (the same families and code paths, small seeded
configurations at small sides), the recipe's other settings kept."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import TINY_CLIP, TeacherSpec
from radio_distill.evaluate.config import EvalConfig
from radio_distill.evaluate.report import evaluate
from radio_distill.train.config import load_train_config
from radio_distill.train.loop import train

RECIPE = Path(__file__).parents[1] / "recipes" / "c-radiov4"
LOW, HIGH = (128, 192, 224, 256, 384, 432), (512, 768, 1024, 1152)  # the report's two partitions


def test_the_recipe_holds_the_published_setup(tmp_path):
    cfg = load_cache_config(RECIPE / "build.toml", data=tmp_path, out=tmp_path / "s.zarr")
    specs = {s.name: s for s in cfg.teachers}
    assert list(specs) == ["siglip2", "siglip2_x3", "dinov3", "dinov3_hi", "sam3"]
    assert (specs["siglip2"].model, specs["siglip2"].resolution, specs["siglip2_x3"].tiles) == (
        "ViT-gopt-16-SigLIP2-384", 384, 3)
    assert specs["dinov3"].model == specs["dinov3_hi"].model == "vit_7b_patch16_dinov3.lvd1689m"
    assert (specs["sam3"].family, specs["sam3"].model, specs["sam3"].resolution) == ("sam3", "facebook/sam3", 1008)
    assert all(s.fidelity == 0.99 for s in cfg.storage.values())
    run = load_train_config(RECIPE / "train.toml", store=tmp_path, out=tmp_path / "run")
    assert run.side_sets == (LOW, HIGH) and run.resolution_policy == "partition" and len(run.batch_sizes) == 2
    assert run.student == "vit_so400m_patch16_radio_v4" and run.loss.kind == "phis" and run.denoise == "shift"


def _stand_in(spec: TeacherSpec) -> TeacherSpec:
    """The tiny seeded teacher of `spec`'s family, under its name and with its tiling."""
    tiny = {"clip": TeacherSpec(spec.name, "clip", TINY_CLIP, resolution=64),
            "timm": TeacherSpec(spec.name, "timm", "vit_small_patch16_dinov3", resolution=64 if spec.resolution < 512
                                else 96, model_kwargs=(("depth", 2), ("embed_dim", 48), ("num_heads", 2))),
            "sam3": TeacherSpec(spec.name, "sam3", "tiny", resolution=112)}[spec.family]
    return replace(tiny, random_init=True, preset="tiny", tiles=spec.tiles)


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_with_tiny_stand_ins(tmp_path, ray_session):
    images = make_sample_dataset(tmp_path / "data", images=24, size=96)
    cfg = load_cache_config(RECIPE / "build.toml", data=images, out=tmp_path / "cache.zarr", shard_size=8,
                            workers=2)
    cfg = replace(cfg, teachers=tuple(_stand_in(s) for s in cfg.teachers))
    build_cache(cfg, progress=False)
    recipe = load_train_config(RECIPE / "train.toml", store=cfg.out, out=tmp_path / "run")
    small = replace(recipe, student="test_vit", steps=2, resolution=((32, 48), (144, 160)), batch_size=(4, 2),
                    holdout=0.3, workers=0, device="cpu", log_every=1, warmup_steps=1)
    assert train(small, progress=False)["step"] == 2
    pairing = json.loads((small.out / "run.json").read_text())["pairing"]
    assert {t for t in pairing["32"] if t.startswith("siglip2")} == {"siglip2"}  # the global map at low sides
    assert {t for t in pairing["160"] if t.startswith("siglip2")} == {"siglip2_x3"}  # its 176 px canvas up high
    assert "dinov3_hi" in pairing["160"] and "dinov3" in pairing["32"]
    report = evaluate(EvalConfig(store=cfg.out, run=small.out, out=tmp_path / "eval", workers=0, throughput=False,
                                 pictures=1, probe_steps=5), progress=False)
    assert set(report["fidelity"]["teachers"]) == {"siglip2", "siglip2_x3", "dinov3", "dinov3_hi", "sam3"}
