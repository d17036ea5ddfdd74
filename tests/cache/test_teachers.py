"""Teachers: one contract over the registry, weight files loaded by each library, specs refused before work."""

import hashlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from radio_distill.cache.teachers import (FAMILIES, TEACHERS, TeacherSpec, build_teacher, check_spec, identity,
                                          parse_teacher, tiny_teachers)
from radio_distill.cache.teachers import grid as meta_grid
from radio_distill.errors import TeacherSpecError

# (grid, summary dims, spatial dims) the tiny configs define: CLIP 64 px / 8 px patches, width 64,
# embed 32; DINOv2 112 px / 14 px patches, width 48; SAM 64 px / 8 px patches, neck 32 channels.
# The timm family at toy sizes (random init): SigLIP (no prefix tokens, attention-pool summary) at
# 64 px / 8 px patches, width 48; DINOv3 (CLS + 4 registers, average-pool summary) at 64 px / 16 px.
TOY = (("depth", 2), ("embed_dim", 48), ("num_heads", 2))
TIMM = {"siglip": TeacherSpec("siglip", "timm", "vit_base_patch16_siglip_224", resolution=64, random_init=True,
                              model_kwargs=(*TOY, ("patch_size", 8))),
        "dinov3": TeacherSpec("dinov3", "timm", "vit_small_patch16_dinov3", resolution=64, random_init=True,
                              model_kwargs=TOY)}
TINY_SHAPES = {"clip": ((8, 8), 32, 64), "dinov2": ((8, 8), 48, 48), "sam": ((8, 8), None, 32), "timm": ((8, 8), 48, 48),
               "sam2": ((8, 8), None, 32), "sam3": ((8, 8), None, 32)}
SAM_TINY = {"sam2": TeacherSpec("sam2", "sam2", "tiny", resolution=128, random_init=True),  # test configurations
            "sam3": TeacherSpec("sam3", "sam3", "tiny", resolution=112, random_init=True)}


@pytest.fixture(scope="module")
def family_teachers(teachers) -> dict:
    """One built teacher per family: the tiny preset, the toy SigLIP for `timm`, the tiny SAM 2 and SAM 3."""
    return {**teachers, "timm": build_teacher(TIMM["siglip"]), **{n: build_teacher(s) for n, s in SAM_TINY.items()}}


def test_registry_covers_every_family_and_the_tiny_preset():
    assert set(TEACHERS) == set(FAMILIES)
    assert sorted(s.family for s in tiny_teachers()) == ["clip", "dinov2", "sam"]  # timm models join by name


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_teacher_contract(family_teachers, name):
    teacher = family_teachers[name]
    grid, summary_dim, spatial_dim = TINY_SHAPES[name]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    info = teacher.info()
    assert (info.grid, info.summary_dim, info.spatial_dim) == (grid, summary_dim, spatial_dim)
    assert meta_grid(teacher.spec) == grid  # known before loading: --pool is checked against it
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
def test_random_init_teachers_are_seeded(family_teachers, name):
    again = build_teacher(family_teachers[name].spec)
    for (k, a), (_, b) in zip(family_teachers[name].state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("which, prefix", [("siglip", 0), ("dinov3", 5)])
def test_timm_teacher_is_pre_logits_summary_and_non_prefix_tokens(which, prefix):
    teacher = build_teacher(TIMM[which])
    model = teacher.model
    assert model.num_prefix_tokens == prefix
    assert (teacher.mean, teacher.std) == (tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"]))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        summary, spatial = teacher(x)
        tokens = model.forward_features(x)  # (B, prefix + h * w, C)
        pooled = model.forward_head(tokens, pre_logits=True)
    grid = 64 // model.patch_embed.patch_size[0]
    assert tokens.shape[1] == prefix + grid * grid
    torch.testing.assert_close(summary, pooled, rtol=0, atol=0)
    torch.testing.assert_close(spatial, tokens[:, prefix:].reshape(2, grid, grid, -1), rtol=0, atol=0)


def test_timm_weight_file_is_loaded_by_timm(tmp_path):
    spec = TIMM["dinov3"]
    g = torch.Generator().manual_seed(7)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in build_teacher(spec).model.state_dict().items()}
    path = tmp_path / "dinov3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = build_teacher(replace(spec, weights=str(path)))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    ident = identity(loaded.spec)
    assert ident["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and ident["weights"] == path.name
    assert ident["family"] == "timm" and ident["model_kwargs"] == dict(spec.model_kwargs)


@pytest.mark.parametrize("spec", [tiny_teachers()[0], TeacherSpec("siglip", "clip", "ViT-B-16-SigLIP", resolution=64,
                                                                  random_init=True)], ids=["open_clip-vit", "siglip"])
def test_clip_summary_is_encode_image_also_for_a_timm_tower(spec):
    """open_clip's SigLIP image tower is a timm ViT that returns only its pooled output: the teacher
    reads the patch tokens from the trunk, and its summary stays exactly `encode_image`."""
    teacher = build_teacher(spec)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        summary, spatial = teacher(x)
        want = teacher.model.encode_image(x)
    want = want[0] if isinstance(want, tuple) else want  # open_clip's ViT with output_tokens: (pooled, tokens)
    torch.testing.assert_close(summary, want.float(), rtol=1e-5, atol=1e-5)
    assert spatial.shape[:3] == (2, 64 // teacher.patch, 64 // teacher.patch)
    if spec.model == "ViT-B-16-SigLIP":
        trunk = teacher.model.visual.trunk
        with torch.inference_mode():
            tokens = trunk.forward_features(x)
        assert trunk.num_prefix_tokens == 0 and spatial.shape == (2, 4, 4, 768)
        torch.testing.assert_close(spatial, tokens.reshape(2, 4, 4, -1), rtol=0, atol=0)


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


@pytest.mark.parametrize("spec, grid", [("sam:vit_b:/nowhere/sam_vit_b.pth", (64, 64)),
                                        ("dinov2:vit_small_patch14_reg4_dinov2.lvd142m", (37, 37)),  # its 518 px
                                        ("dinov2:vit_small_patch14_reg4_dinov2.lvd142m@224", (16, 16))])
def test_the_grid_of_real_teachers_is_known_without_their_weights(spec, grid):
    assert meta_grid(parse_teacher(spec)) == grid


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
    ("timm:vit_nope_patch16", "unknown timm model 'vit_nope_patch16'; see timm.list_models.*siglip"),
    ("timm:vit_base_patch16_siglip_224.nope", "unknown pretrained tag 'nope' for timm model"),
    ("timm:vit_base_patch16_siglip_224:webli", "timm weights 'webli' must be a local file"),
    ("timm:resnet18", "timm model 'resnet18' has no patch tokens"),
])
def test_check_spec_refuses_before_loading(text, culprit):
    with pytest.raises(TeacherSpecError, match=culprit):
        check_spec(parse_teacher(text))


def test_check_spec_accepts_known_models_without_loading():
    check_spec(parse_teacher("clip:ViT-B-16:openai@224"))
    check_spec(parse_teacher("dinov2:vit_large_patch14_reg4_dinov2.lvd142m@448"))
    check_spec(parse_teacher("timm:vit_so400m_patch14_siglip_384.webli@384"))
    check_spec(parse_teacher("timm:vit_large_patch16_dinov3.lvd1689m"))
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


def test_weight_files_are_recorded_and_found_again_only_unchanged(tmp_path, monkeypatch):
    import zarr

    from radio_distill.cache.build import _record_weight_files
    from radio_distill.cache.teachers import locate_weights, sha256_file, weight_files

    first = tmp_path / "a" / "sam.safetensors"
    first.parent.mkdir()
    first.write_bytes(b"weights")
    spec = TeacherSpec("sam", "sam", "toy", weights=str(first), resolution=128, preset="toy")
    specs = [spec, *tiny_teachers()[:2]]  # tiny teachers load no file: not recorded
    assert weight_files(specs) == {"sam": str(first.resolve())}
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    _record_weight_files(root, specs)
    assert root.attrs["weight_files"] == {"sam": str(first.resolve())}
    ident = identity(spec)
    assert ident["weights"] == "sam.safetensors" and ident["sha256"] == sha256_file(first)
    assert locate_weights(ident, root.attrs["weight_files"]["sam"]) == (first.resolve(), [])
    # the same file moved: a rebuild from there records the new place (the identity is the same)
    moved = tmp_path / "b" / "sam.safetensors"
    moved.parent.mkdir()
    first.rename(moved)
    assert identity(TeacherSpec("sam", "sam", "toy", weights=str(moved), resolution=128, preset="toy")) == ident
    monkeypatch.setattr("radio_distill.cache.teachers.TOY_DIR", tmp_path / "c")
    assert locate_weights(ident, str(first)) == (None, [f"{first} (missing)", f"{tmp_path / 'c' / 'sam.safetensors'} "
                                                                             "(missing)"])
    _record_weight_files(root, [TeacherSpec("sam", "sam", "toy", weights=str(moved), resolution=128, preset="toy")])
    assert locate_weights(ident, root.attrs["weight_files"]["sam"]) == (moved.resolve(), [])
    moved.write_bytes(b"changed")
    assert locate_weights(ident, str(moved))[1][0] == f"{moved} (changed)"
    monkeypatch.setattr("radio_distill.cache.teachers.TOY_DIR", tmp_path / "c")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sam.safetensors").write_bytes(b"weights")  # the toy preset's own folder is looked in last
    assert locate_weights(ident, str(moved))[0] == tmp_path / "c" / "sam.safetensors"
    assert locate_weights({**ident, "preset": None}, str(moved))[0] is None  # only for the toy preset
    assert locate_weights({"weights": "openai", "sha256": None}) == (None, [])  # a tag, not a file
