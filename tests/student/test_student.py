"""Contract tests over every student family, plus registry errors and save / load."""

import json

import pytest
import torch
from safetensors import safe_open

from radio_distill.errors import UnknownStudentError
from radio_distill.student import (StudentOutput, TeacherDims, create_student, list_students,
                                   load_student, save_student)

TEACHERS = {"clip": TeacherDims(32, 64), "dinov2": TeacherDims(48, 48), "sam": TeacherDims(None, 32)}
NAMES = ["test_vit", "test_convnext", "test_resnet", "test_eradio", "test_vitdet"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_output_contract(name, size):
    torch.manual_seed(0)
    model = create_student(name, teachers=TEACHERS)
    H, W = size
    assert H % model.input_stride == 0 and len(model.mean) == len(model.std) == 3
    out = model(torch.randn(2, 3, H, W))
    assert isinstance(out, StudentOutput)
    r, D = model.feature_info["reduction"], model.feature_info["num_chs"]
    h, w = H // r, W // r
    summary, spatial = out.backbone
    assert spatial.shape == (2, D, h, w) and summary.shape[0] == 2 and summary.ndim == 2
    assert list(out.teachers) == list(TEACHERS)
    for t, dims in TEACHERS.items():
        s, f = out.teachers[t]
        assert f.shape == (2, dims.spatial_dim, h, w)
        assert (s is None) if dims.summary_dim is None else s.shape == (2, dims.summary_dim)
    tokens, fmap = model.forward_features(torch.randn(1, 3, H, W))
    assert tokens.ndim == 3 and fmap.shape == (1, D, h, w)


def test_vit_summary_tokens_and_other_resolution():
    model = create_student("test_vit", teachers=TEACHERS, num_registers=3)
    vit = model.backbone.model
    assert vit.num_prefix_tokens == 2 + 3 and vit.cls_token is None
    out = model(torch.randn(1, 3, 208, 48))  # default is 160x160
    assert out.backbone.spatial.shape[-2:] == (13, 3)
    assert out.backbone.summary.shape == (1, 2 * vit.embed_dim)  # one token per summary teacher
    with pytest.raises(ValueError, match="divisible by 16, got 65x64"):
        model(torch.randn(1, 3, 65, 64))


def test_timm_mean_std_and_stride():
    assert create_student("test_vit", teachers={}).mean == (0.5, 0.5, 0.5)  # timm's cfg
    assert create_student("test_convnext", teachers={}).input_stride == 32


def test_registry():
    assert {"test_eradio", "eradio_small", "eradio_base", "eradio_large"} <= set(list_students())
    assert list_students("eradio_*") == ["eradio_base", "eradio_large", "eradio_small"]
    with pytest.raises(UnknownStudentError, match=r"unknown student 'vit_smal_patch16_224'.*"
                       r"vit_small_patch16_224.*list_students\(\).*timm.list_models\('vit\*'\)"):
        create_student("vit_smal_patch16_224", teachers=TEACHERS)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_student(name, teachers=TEACHERS, head_hidden=40).eval()
    save_student(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["student"] == name and config["overrides"] == {"head_hidden": 40}
    assert config["teachers"]["sam"] == {"summary_dim": None, "spatial_dim": 32, "upsample": 1}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # safetensors: no pickle
        assert set(f.keys()) == set(model.state_dict())
    loaded = load_student(tmp_path)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.backbone.spatial, b.backbone.spatial)
    for t in TEACHERS:
        assert torch.equal(a.teachers[t].spatial, b.teachers[t].spatial)
        if a.teachers[t].summary is not None:
            assert torch.equal(a.teachers[t].summary, b.teachers[t].summary)


@pytest.mark.parametrize("name", NAMES + ["mobilenetv3_small_100", "hgnetv2_b0",
                                          "convnext_atto", "vit_tiny_patch16_224"])
def test_every_parameter_gets_a_gradient(name):
    """DDP refuses parameters a step never reaches (a timm head's conv_head, norm_head, classifier...)."""
    torch.manual_seed(0)
    model = create_student(name, teachers=TEACHERS)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.backbone.spatial.mean() + sum(f.spatial.mean() + (0 if f.summary is None else f.summary.mean())
                                            for f in out.teachers.values())
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_pretrained_vit_student_is_refused_clearly():
    with pytest.raises(ValueError, match="pretrained=True is not supported for ViT student"):
        create_student("test_vit", teachers=TEACHERS, pretrained=True)


def test_head_parts_that_forward_features_uses_are_kept():
    # efficientnet's forward_features ends in conv_head (320 -> 1280 channels): it must stay
    model = create_student("efficientnet_b0", teachers=TEACHERS)
    assert model.feature_info["num_chs"] == 1280 and isinstance(model.backbone.model.conv_head, torch.nn.Conv2d)
    assert model(torch.randn(1, 3, 64, 64)).backbone.spatial.shape == (1, 1280, 2, 2)


def test_a_timm_model_without_a_feature_map_is_refused_by_name():
    with pytest.raises(UnknownStudentError, match=r"timm model 'test_vit_relpos' cannot be a student: .*"
                                                   r"\(2, 100, 96\) tensor, not a \(B, D, h, w\) feature map"):
        create_student("test_vit_relpos", teachers=TEACHERS)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_students_build_and_load_without_grad(mode, tmp_path):
    """A timm map student traces its features with autograd when built: that must work under no_grad too."""
    save_student(create_student("test_resnet", teachers=TEACHERS), tmp_path)
    with mode():
        assert create_student("test_resnet", teachers=TEACHERS).input_stride == 32
        assert load_student(tmp_path).input_stride == 32


@pytest.mark.parametrize("name", ["test_vit", "test_eradio"])
def test_an_upsampled_head_draws_k_by_k_tokens_per_student_token(name, tmp_path):
    """The head's Ct·k² outputs of token (i, j) fill block (k i .. k i + k-1, k j .. k j + k-1) of the map, channel c's
    sub-token (di, dj) from output c k² + di k + dj: with a zero weight and a known bias, the map is that bias tiled."""
    teachers = {**TEACHERS, "sam": TeacherDims(None, 3, upsample=2)}
    torch.manual_seed(0)
    model = create_student(name, teachers=teachers).eval()
    last = model.spatial_heads["sam"].final[-1]
    assert last.out_features == 3 * 4
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(12.0))
        out = model(torch.randn(2, 3, 64, 96))
    h, w = out.backbone.spatial.shape[-2:]
    got = out.teachers["sam"].spatial
    assert got.shape == (2, 3, 2 * h, 2 * w) and out.teachers["clip"].spatial.shape == (2, 64, h, w)
    block = torch.arange(12.0).view(3, 2, 2)  # (c, di, dj)
    assert torch.equal(got, block.repeat(1, h, w).expand(2, -1, -1, -1))
    save_student(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["teachers"]["sam"]["upsample"] == 2
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path)(torch.zeros(1, 3, 64, 96)).teachers["sam"].spatial, got[:1])
