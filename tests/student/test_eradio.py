"""E-RADIO: shapes, window rule, input checks, BN folding, gradients, published size."""

import pytest
import torch

from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.student.eradio import WindowAttention, window_size

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (128, 128), (64, 160)])
def test_shapes(size):
    model = create_student("test_eradio", teachers=TEACHERS)
    H, W = size
    out = model(torch.randn(2, 3, H, W))
    assert out.backbone.spatial.shape == (2, 64, H // 16, W // 16)
    assert out.backbone.summary.shape == (2, 64)
    assert out.teachers["clip"].summary.shape == (2, 32)
    assert out.teachers["sam"].spatial.shape == (2, 32, H // 16, W // 16)


@pytest.mark.parametrize("side,window,expected", [
    (14, 16, (14, 1)), (32, 16, (16, 2)), (48, 16, (16, 3)), (34, 16, (12, 3)), (7, 16, (7, 1)),
    (17, 16, (9, 2)), (6, 4, (3, 2)), (2, 4, (2, 1)),
])
def test_window_rule(side, window, expected):
    assert window_size(side, window) == expected


def test_padded_windows_match_manual_masking():
    torch.manual_seed(0)
    attn = WindowAttention(8, 2, 4, window=4)  # side 5 -> 2 windows of 3, one padded token
    x = torch.randn(1, 5, 5, 8)
    y = attn(x)
    assert y.shape == (1, 5, 5, 8) and torch.isfinite(y).all()
    # the top-left window holds only real tokens, so it equals attention on that crop alone
    assert torch.allclose(y[:, :3, :3], attn(x[:, :3, :3]), atol=1e-6)


def test_input_must_be_divisible_by_32():
    model = create_student("test_eradio", teachers=TEACHERS)
    with pytest.raises(ValueError, match="E-RADIO needs an input side divisible by 32, got 100x224"):
        model(torch.randn(1, 3, 100, 224))


def test_switch_to_deploy_folds_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = create_student("test_eradio", teachers=TEACHERS)
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        model.switch_to_deploy()
        out = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (ref.backbone.spatial - out.backbone.spatial).abs().max() < 1e-4
    assert (ref.teachers["clip"].summary - out.teachers["clip"].summary).abs().max() < 1e-4
    save_student(model, tmp_path)  # a deployed student reloads deployed
    with torch.no_grad():
        assert torch.equal(load_student(tmp_path)(x).backbone.spatial, out.backbone.spatial)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = create_student("test_eradio", teachers=TEACHERS, drop_path_rate=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    loss = out.backbone.summary.sum() + sum(
        f.spatial.square().mean() + (0 if f.summary is None else f.summary.square().mean())
        for f in out.teachers.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_eradio_large_published_size():
    with torch.device("meta"):
        model = create_student("eradio_large", teachers={})
    cfg = model.backbone.cfg
    assert cfg.widths == (192, 384, 768, 1536) and cfg.depths == (3, 3, 5, 5)
    assert cfg.heads == (2, 4, 8, 16) and cfg.window == 16
    n = sum(p.numel() for p in model.backbone.parameters())
    print(f"eradio_large backbone: {n / 1e6:.1f}M parameters")
    assert 100e6 < n < 600e6
