"""SAM 2 (Meta's `sam2`) and SAM 3 (transformers' `Sam3TrackerModel`) teachers: specs, the target levels, and
a built store whose targets are each library's own image embedding of the stored crop (known answers).

Small seeded configurations: `sam2:tiny` (128 px, an 8 x 8 x 32 embedding) and `sam3:tiny` (112 px, 8 x 8 x 32),
their weights saved to files the way users have them and loaded back through the ordinary specs.
"""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from radio_distill.cache.build import build_cache
from radio_distill.cache.teachers import (TeacherSpec, build_teacher, check_spec, grid, identity, parse_teacher,
                                          weight_sources)
from radio_distill.errors import TeacherSpecError
from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.store.dataset import load_rgb
from radio_distill.store.group import open_store
from radio_distill.store.views import crop_resize

from .conftest import _perturbed

SAM2_TINY = TeacherSpec("sam2", "sam2", "tiny", resolution=128, random_init=True)
SAM3_TINY = TeacherSpec("sam3", "sam3", "tiny", resolution=112, random_init=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{'sam2': (checkpoint .pt as sam2's build_sam2 reads it, teacher), 'sam3': (save_pretrained folder, teacher)}."""
    folder = tmp_path_factory.mktemp("sam_weights")
    sam2, sam3 = _perturbed(SAM2_TINY), _perturbed(SAM3_TINY)
    torch.save({"model": sam2.model.state_dict()}, folder / "sam2_tiny.pt")
    sam3.model.save_pretrained(folder / "sam3_tiny")
    return {"sam2": (folder / "sam2_tiny.pt", sam2), "sam3": (folder / "sam3_tiny", sam3)}


def _sam2_predictor(model):
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the predictor assumes 1024 px; the tiny model is 128
    return predictor


def test_parse_and_grid_without_weights():
    spec = parse_teacher("sam2:configs/sam2.1/sam2.1_hiera_l.yaml:/w/sam2.1_hiera_large.pt@1024")
    assert (spec.family, spec.model, spec.weights, spec.resolution) == (
        "sam2", "configs/sam2.1/sam2.1_hiera_l.yaml", "/w/sam2.1_hiera_large.pt", 1024)
    assert grid(spec) == (64, 64) and grid(replace(spec, sam_spatial="s1")) == (128, 128)
    assert grid(replace(spec, sam_spatial="s0")) == (256, 256)
    spec = parse_teacher("sam3:facebook/sam3@1008")
    assert (spec.family, spec.model, spec.weights, spec.resolution) == ("sam3", "facebook/sam3", None, 1008)
    assert weight_sources(spec) == [("hf", "facebook/sam3", None, "model.safetensors")]
    assert grid(SAM2_TINY) == (8, 8) and grid(SAM3_TINY) == (8, 8)
    assert grid(replace(SAM3_TINY, sam_spatial="s0")) == (32, 32)  # 112 px at 3.5 px per cell


@pytest.mark.parametrize("text, culprit", [
    ("sam2:configs/nope.yaml:/nowhere.pt", "weight file '/nowhere.pt' does not exist"),
    ("sam2:configs/nope.yaml", "unknown SAM 2 config 'configs/nope.yaml'; available: tiny, configs/sam2.1/"),
    ("sam2:configs/sam2.1/sam2.1_hiera_t.yaml", "SAM 2 needs a checkpoint file, e.g. sam2:configs/sam2.1/"),
    ("sam2:configs/sam2.1/sam2.1_hiera_t.yaml:ckpt", "SAM 2 checkpoint 'ckpt' is not a file"),
    ("sam3:facebook/sam3:weights", "SAM 3 loads its weights with its model"),
    ("sam3:tiny", "sam3:tiny is the seeded test configuration"),
    ("sam3:/nowhere/sam3", "SAM 3 model '/nowhere/sam3' is neither a hub id nor a folder with a config.json"),
])
def test_bad_specs_are_refused_in_one_line(text, culprit):
    with pytest.raises(TeacherSpecError, match=culprit) as e:
        check_spec(parse_teacher(text))
    assert "\n" not in str(e.value)


def test_bad_target_levels_are_refused():
    with pytest.raises(TeacherSpecError, match="SAM 2 spatial target 'preneck' is not one of neck, s1, s0"):
        check_spec(replace(SAM2_TINY, sam_spatial="preneck"))
    with pytest.raises(TeacherSpecError, match="SAM 3 spatial target 'preneck' is not one of neck, s1, s0"):
        check_spec(replace(SAM3_TINY, sam_spatial="preneck"))
    for check in (build_teacher, grid):  # grid: before the build starts
        with pytest.raises(TeacherSpecError, match="SAM 2 'tiny' runs at 128 px only, not 256"):
            check(replace(SAM2_TINY, resolution=256))
        with pytest.raises(TeacherSpecError, match="SAM 3 'tiny' runs at 112 px only, not 224"):
            check(replace(SAM3_TINY, resolution=224))


def test_weights_load_through_the_spec_and_are_recorded(saved):
    """sam2:tiny:FILE and sam3:FOLDER load the saved (perturbed) weights, not a seeded init; the identity
    records the file's or folder's sha256 and the target level."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for family, spec in (("sam2", replace(SAM2_TINY, weights=str(saved["sam2"][0]), random_init=False)),
                         ("sam3", replace(SAM3_TINY, model=str(saved["sam3"][0]), random_init=False))):
        check_spec(spec)
        loaded, want, seeded = build_teacher(spec), saved[family][1], build_teacher(
            SAM2_TINY if family == "sam2" else SAM3_TINY)
        side = x[..., :loaded.resolution, :loaded.resolution]
        with torch.inference_mode():
            got = loaded(side)[1]
            assert loaded(side)[0] is None and torch.equal(got, want(side)[1]), family
            assert not torch.allclose(got, seeded(side)[1], atol=1e-3), family
        ident = identity(spec)
        assert ident["spatial"] == "neck" and len(ident["sha256"]) == 64, ident


def test_sam2_levels_are_set_images_features(saved):
    """neck, s1, s0 are `SAM2ImagePredictor.set_image`'s image_embed and high_res_feats of the same image."""
    path, _ = saved["sam2"]
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    spec = replace(SAM2_TINY, weights=str(path), random_init=False)
    teachers = {level: build_teacher(replace(spec, sam_spatial=level)) for level in ("neck", "s1", "s0")}
    predictor = _sam2_predictor(teachers["neck"].model)
    predictor.set_image(image)
    want = {"neck": predictor._features["image_embed"], "s1": predictor._features["high_res_feats"][1],
            "s0": predictor._features["high_res_feats"][0]}
    t = teachers["neck"]
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(t.mean).view(1, 3, 1, 1)
         ) / torch.tensor(t.std).view(1, 3, 1, 1)
    for level, teacher in teachers.items():
        with torch.inference_mode():
            got = teacher(x)[1].permute(0, 3, 1, 2)
        assert got.shape == want[level].shape and teacher.info().grid == tuple(got.shape[-2:]), level
        torch.testing.assert_close(got, want[level], rtol=1e-5, atol=1e-5)


def test_sam3_levels_are_get_image_embeddings(saved):
    """neck, s1, s0 are `Sam3TrackerModel.get_image_embeddings`' last, second and first maps."""
    folder, model = saved["sam3"][0], saved["sam3"][1].model
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.get_image_embeddings(x)
    for level, k in (("neck", 2), ("s1", 1), ("s0", 0)):
        teacher = build_teacher(replace(SAM3_TINY, model=str(folder), random_init=False, sam_spatial=level))
        with torch.inference_mode():
            got = teacher(x)[1].permute(0, 3, 1, 2)
        assert teacher.info().grid == tuple(want[k].shape[-2:]), level
        torch.testing.assert_close(got, want[k], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sam_store(ray_session, small_config, saved, tmp_path_factory):
    """small_dataset cached by SAM 2's and SAM 3's three levels each, fp16 targets (to compare by value)."""
    sam2, sam3 = saved["sam2"][0], saved["sam3"][0]
    entries = [f"sam2=sam2:tiny:{sam2}@128", {"spec": f"sam2_s1=sam2:tiny:{sam2}@128", "sam_spatial": "s1"},
               {"spec": f"sam2_s0=sam2:tiny:{sam2}@128", "sam_spatial": "s0"}, f"sam3=sam3:{sam3}@112",
               {"spec": f"sam3_s1=sam3:{sam3}@112", "sam_spatial": "s1"},
               {"spec": f"sam3_s0=sam3:{sam3}@112", "sam_spatial": "s0"}]
    out = tmp_path_factory.mktemp("sam_store") / "cache.zarr"
    report = build_cache(small_config(out, teachers=entries, spatial_codec="fp16", workers=1), progress=False)
    assert report["complete"] and report["ok"] == 8, report
    return out


@pytest.mark.slow  # a Ray build with six teachers (~35 s); the teachers alone: test_sam*_levels_are_*
def test_stored_targets_are_each_librarys_own_embedding_of_the_crop(sam_store, small_dataset, saved):
    """The stored maps of one sample's views equal `SAM2ImagePredictor.set_image`'s features and
    `Sam3TrackerModel.get_image_embeddings` (pixels by `Sam3TrackerProcessor`) of the stored crop, to fp16."""
    from transformers import Sam3TrackerProcessor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    root = open_store(sam_store)
    settings = root.attrs["settings"]["teachers"]
    assert {n: (t["family"], t["spatial"]) for n, t in settings.items()} == {
        "sam2": ("sam2", "neck"), "sam2_s1": ("sam2", "s1"), "sam2_s0": ("sam2", "s0"), "sam3": ("sam3", "neck"),
        "sam3_s1": ("sam3", "s1"), "sam3_s0": ("sam3", "s0")}
    assert root[L.teacher_group("sam2_s0")].attrs["grid"] == root[L.teacher_group("sam3_s0")].attrs["grid"] == [32, 32]
    k = 3
    sample = str(root[L.IDS][k])
    image, span, _ = load_rgb(small_dataset / sample, min_side=128)
    sam2_model, sam3_model = saved["sam2"][1].model, saved["sam3"][1].model
    processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor(size={"height": 112, "width": 112}))
    for v, box in enumerate(root[L.BOXES][k]):
        predictor = _sam2_predictor(sam2_model)
        predictor.set_image(crop_resize(image, box, 128, span=span))
        f = predictor._features
        pixels = processor(images=crop_resize(image, box, 112, span=span), return_tensors="pt")["pixel_values"]
        sam3 = sam3_model.get_image_embeddings(pixels)
        want = {"sam2": f["image_embed"], "sam2_s1": f["high_res_feats"][1], "sam2_s0": f["high_res_feats"][0],
                "sam3": sam3[2], "sam3_s1": sam3[1], "sam3_s0": sam3[0]}
        for name, w in want.items():
            stored = codecs.decode(torch.from_numpy(root[L.target_array(name, "spatial")][k, v]), None)
            w = w[0].permute(1, 2, 0).float()
            assert stored.shape == w.shape, name
            torch.testing.assert_close(stored.float(), w, rtol=2e-3, atol=2e-3 * float(w.abs().max()))
            if v == 1:  # the other view's crop gives other features: the comparison can tell them apart
                other = codecs.decode(torch.from_numpy(root[L.target_array(name, "spatial")][k, 0]), None)
                assert not torch.allclose(other.float(), w, rtol=0, atol=1e-2 * float(w.abs().max())), name


@pytest.mark.parametrize("spec, culprit", [
    ("sam2:configs/nope.yaml:/nowhere.pt", "weight file '/nowhere.pt' does not exist"),
    ("sam3:/nowhere/sam3", "SAM 3 model '/nowhere/sam3' is neither a hub id nor a folder"),
    ("sam3:nobody/nothing@1008", "SAM 3 model 'nobody/nothing' cannot be loaded .*`hf download nobody/nothing`"),
])
def test_radio_cache_build_refuses_bad_specs_in_one_line(tmp_path, monkeypatch, spec, culprit):
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from radio_distill.cli import cache_app
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub id not in the cache
    (tmp_path / "data").mkdir()
    result = CliRunner().invoke(cache_app, ["build", str(tmp_path / "data"), "--out", str(tmp_path / "x.zarr"),
                                            "--teacher", spec])
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(culprit, lines[0]), lines[0]
    assert not (tmp_path / "x.zarr").exists()
