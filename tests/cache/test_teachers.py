"""Teachers: one contract over the registry, weight files loaded by each library, specs refused before work."""

import hashlib
from dataclasses import replace

import pytest
import torch

from radio_distill.cache.teachers import (FAMILIES, TEACHERS, TeacherSpec, build_teacher, check_spec, identity,
                                          parse_teacher, tiny_teachers)
from radio_distill.errors import TeacherSpecError

# (grid, summary dims, spatial dims) the tiny configs define: CLIP 64 px / 8 px patches, width 64,
# embed 32; DINOv2 112 px / 14 px patches, width 48; SAM 64 px / 8 px patches, neck 32 channels.
TINY_SHAPES = {"clip": ((8, 8), 32, 64), "dinov2": ((8, 8), 48, 48), "sam": ((8, 8), None, 32)}


def test_registry_covers_every_family_and_the_tiny_preset():
    assert set(TEACHERS) == set(FAMILIES)
    assert sorted(s.family for s in tiny_teachers()) == sorted(FAMILIES)


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_contract(teachers, name):
    teacher = teachers[name]
    grid, summary_dim, spatial_dim = TINY_SHAPES[name]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    info = teacher.info()
    assert (info.grid, info.summary_dim, info.spatial_dim) == (grid, summary_dim, spatial_dim)
    assert info.resolution == teacher.resolution and len(info.mean) == len(info.std) == 3
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)  # for pixels in [0, 1]
    x = torch.randn(2, 3, teacher.resolution, teacher.resolution)
    summary, spatial = teacher(x)
    assert spatial.shape == (2, *grid, spatial_dim) and spatial.dtype == torch.float32
    assert summary is None if summary_dim is None else summary.shape == (2, summary_dim)
    assert torch.isfinite(spatial).all()
    # each sample's output depends on its own image only
    _, other = teacher(torch.cat([x[:1], torch.randn(1, 3, teacher.resolution, teacher.resolution)]))
    assert torch.allclose(other[0], spatial[0], atol=1e-5)
    assert not torch.allclose(other[1], spatial[1], atol=1e-3)


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_tiny_teachers_are_seeded(tiny_specs, teachers, name):
    again = build_teacher(tiny_specs[name])
    for (k, a), (_, b) in zip(teachers[name].state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("label", ["clip", "dinov2-safetensors", "dinov2-pth", "sam"])
def test_weight_file_is_loaded_by_its_library(weight_files, teachers, label):
    spec, path, perturbed = weight_files[label]
    loaded = build_teacher(replace(spec, weights=str(path)))
    for (k, a), (_, b) in zip(perturbed.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    torch.manual_seed(0)
    x = torch.randn(2, 3, loaded.resolution, loaded.resolution)
    with torch.inference_mode():
        got, want, seeded = loaded(x), perturbed(x), teachers[spec.name](x)
    for g, w, s in zip(got, want, seeded):
        if w is None:
            assert g is None and s is None
            continue
        assert torch.equal(g, w)
        assert not torch.allclose(g, s, atol=1e-3)  # a silent random (seeded) init would match this
    ident = identity(replace(spec, weights=str(path)))
    assert ident["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and ident["weights"] == path.name
    assert "sha256" not in identity(spec)


def test_parse_teacher_forms():
    assert parse_teacher("clip:ViT-L-14:openai@224") == TeacherSpec("clip", "clip", "ViT-L-14", "openai", 224)
    assert parse_teacher("clip336=clip:ViT-L-14-336:openai") == TeacherSpec("clip336", "clip", "ViT-L-14-336", "openai")
    spec = parse_teacher(" sam:vit_h:/w/sam_vit_h_4b8939.pth@1024 ")
    assert (spec.name, spec.model, spec.weights, spec.resolution) == ("sam", "vit_h", "/w/sam_vit_h_4b8939.pth", 1024)
    spec = parse_teacher("dinov2:vit_large_patch14_reg4_dinov2.lvd142m@448")
    assert (spec.model, spec.weights, spec.resolution) == ("vit_large_patch14_reg4_dinov2.lvd142m", None, 448)


@pytest.mark.parametrize("text, culprit", [
    ("clip", "bad teacher spec 'clip'"),
    ("clip:ViT-B-16@abc", "bad teacher spec"),
    ("dino:vit_base", "unknown teacher family 'dino'"),
])
def test_parse_teacher_refuses(text, culprit):
    with pytest.raises(TeacherSpecError, match=culprit):
        parse_teacher(text)


@pytest.mark.parametrize("text, culprit", [
    ("clip:ViT-Nope-16:openai", "unknown open_clip model 'ViT-Nope-16'"),
    ("clip:ViT-B-16:nope", "unknown pretrained tag 'nope' for 'ViT-B-16'; available: .*openai"),
    ("clip:ViT-B-16", "needs weights: a pretrained tag"),
    ("clip:ViT-B-16:/nowhere/clip.pt", "weight file '/nowhere/clip.pt' does not exist"),
    ("dinov2:vit_nope_patch14_dinov2", "unknown timm model 'vit_nope_patch14_dinov2'"),
    ("dinov2:vit_small_patch14_dinov2.nope", "unknown pretrained tag 'nope' for timm model 'vit_small_patch14_dinov2'"),
    ("dinov2:vit_small_patch14_dinov2:lvd142m", "DINOv2 weights 'lvd142m' must be a local file"),
    ("sam:vit_x:/nowhere/sam.pth", "weight file '/nowhere/sam.pth' does not exist"),
    ("sam:vit_x", "unknown SAM model 'vit_x'; available: .*vit_h"),
    ("sam:vit_b", "SAM needs a checkpoint file"),
    ("sam:vit_b:sam_b", "SAM checkpoint 'sam_b' is not a file"),
])
def test_check_spec_refuses_before_loading(text, culprit):
    with pytest.raises(TeacherSpecError, match=culprit):
        check_spec(parse_teacher(text))


def test_check_spec_accepts_known_models_without_loading():
    check_spec(parse_teacher("clip:ViT-B-16:openai@224"))
    check_spec(parse_teacher("dinov2:vit_large_patch14_reg4_dinov2.lvd142m@448"))
    for spec in tiny_teachers():
        check_spec(spec)


def test_sam_runs_at_its_own_resolution_only(tiny_specs):
    with pytest.raises(TeacherSpecError, match="runs at 64 px only, not 128"):
        build_teacher(replace(tiny_specs["sam"], resolution=128))


def test_sam_preneck_target(tiny_specs):
    teacher = build_teacher(replace(tiny_specs["sam"], sam_spatial="preneck"))
    summary, spatial = teacher(torch.randn(1, 3, 64, 64))
    assert summary is None and spatial.shape == (1, 8, 8, 32)
    assert identity(teacher.spec)["spatial"] == "preneck"


def test_sam_micro_batches_give_the_same_maps(tiny_specs):
    teacher = build_teacher(tiny_specs["sam"])
    x = torch.randn(teacher.micro_batch * 2 + 3, 3, 64, 64)
    with torch.inference_mode():
        _, whole = teacher(x)
        singles = torch.cat([teacher(x[i:i + 1])[1] for i in range(len(x))])
    assert whole.shape == (len(x), 8, 8, 32)
    torch.testing.assert_close(whole, singles, rtol=1e-5, atol=1e-5)
