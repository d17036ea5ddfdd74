"""ViTDet students: windowed blocks keep windows apart, global blocks where configured, shapes at padded and
unpadded sides, one-line refusals."""

import pytest
import torch

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, list_students

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


def global_blocks(model) -> list[int]:
    return [i for i, block in enumerate(model.backbone.model.blocks) if block.window_size == 0]


@pytest.mark.parametrize("name,width,expect", [("vitdet_tiny", 192, [2, 5, 8, 11]), ("vitdet_small", 384, [2, 5, 8, 11]),
                                               ("vitdet_base", 768, [2, 5, 8, 11]), ("test_vitdet", 64, [1, 3])])
def test_sizes_and_their_global_blocks(name, width, expect):
    with torch.device("meta"):
        model = create_student(name, teachers=TEACHERS)
    assert global_blocks(model) == expect and model.feature_info == {"num_chs": width, "reduction": 16}
    windows = {b.window_size for i, b in enumerate(model.backbone.model.blocks) if i not in expect}
    assert windows == {2 if name == "test_vitdet" else 16} and model.input_stride == 16
    assert set(list_students("*vitdet*")) == {"test_vitdet", "vitdet_tiny", "vitdet_small", "vitdet_base"}


def test_overrides_set_the_global_blocks_and_the_window():
    model = create_student("test_vitdet", teachers=TEACHERS, global_attn_indexes=[0], window_size=3)
    assert global_blocks(model) == [0] and [b.window_size for b in model.backbone.model.blocks] == [0, 3, 3, 3]
    assert global_blocks(create_student("test_vitdet", teachers=TEACHERS, global_attn_indexes=())) == []


@pytest.mark.parametrize("size", [(64, 64), (80, 96)])  # 80: a 5-token side, padded to 3 windows of 2
def test_shapes(size):
    torch.manual_seed(0)
    model = create_student("test_vitdet", teachers=TEACHERS)
    H, W = size
    out = model(torch.randn(2, 3, H, W))
    assert out.backbone.spatial.shape == (2, 64, H // 16, W // 16) and out.backbone.summary.shape == (2, 64)
    assert out.teachers["clip"].summary.shape == (2, 32) and out.teachers["clip"].spatial.shape == (2, 64, H // 16, W // 16)
    assert out.teachers["sam"].summary is None and out.teachers["sam"].spatial.shape == (2, 32, H // 16, W // 16)
    assert torch.allclose(out.backbone.summary, out.backbone.spatial.mean((2, 3)))  # the pooled map


@pytest.mark.parametrize("size", [(64, 96), (80, 96)])
def test_only_global_blocks_carry_a_change_across_windows(size):
    """Pixels of patch (0, 0) changed: with no global block only the tokens of its 2x2-token window change, exactly;
    with the configured global blocks every token does."""
    x = torch.randn(1, 3, *size)
    y = x.clone()
    y[..., :16, :16] += 1
    changed = {}
    for blocks in ((), (1, 3)):
        torch.manual_seed(0)
        model = create_student("test_vitdet", teachers=TEACHERS, global_attn_indexes=blocks).eval()
        with torch.no_grad():
            a, b = model.forward_features(x)[1], model.forward_features(y)[1]  # (1, D, h, w)
        changed[blocks] = (a != b).any(1)[0]  # (h, w)
    window = torch.zeros_like(changed[()])
    window[:2, :2] = True
    assert torch.equal(changed[()], window)
    assert changed[(1, 3)].all()


@pytest.mark.parametrize("overrides,message", [
    ({"window_size": 0}, r"student override window_size=0: must be a whole number of tokens >= 1"),
    ({"global_attn_indexes": [1, 4]}, r"global_attn_indexes: 4 is not a block of 'test_vitdet' \(0 to 3\)"),
    ({"global_attn_indexes": 3}, r"global_attn_indexes=3: must be a list of block indexes"),
    ({"pretrained": True}, r"student 'test_vitdet' has no pretrained weights"),
])
def test_bad_overrides_are_one_line(overrides, message):
    with pytest.raises(RadioDistillError, match=message):
        create_student("test_vitdet", teachers=TEACHERS, **overrides)


def test_a_side_off_the_patch_grid_is_refused_by_student_name():
    with pytest.raises(ValueError, match="test_vitdet needs an input side divisible by 16, got 72x64"):
        create_student("test_vitdet", teachers=TEACHERS)(torch.randn(1, 3, 72, 64))
