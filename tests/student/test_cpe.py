"""CPE (RADIO's cropped position embedding) for ViT students: a random crop of a larger learned grid
per training forward, the whole grid resized in eval mode, recorded for export and resume."""

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, load_student, save_student

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


def cpe_student(**kw):
    torch.manual_seed(0)
    return create_student("test_vit", teachers=TEACHERS, cpe_size=128, **kw)  # test_vit: patch 16 -> an 8x8 grid


def positions(model, h: int, w: int) -> torch.Tensor:
    """(h, w, D) the position embedding a forward adds to zero patch tokens of an h x w grid."""
    D = model.feature_info["num_chs"]
    tokens = model.backbone.model._pos_embed(torch.zeros(1, h, w, D))
    return tokens[0, -h * w:].reshape(h, w, D)


def test_training_adds_a_new_crop_each_forward_and_eval_the_whole_grid():
    model = cpe_student()
    vit = model.backbone.model
    assert vit.pos_embed.shape == (1, 64, vit.embed_dim)  # 8x8, no entries for prefix tokens
    x = torch.randn(2, 3, 32, 32)
    model.train()
    first, second = model(x).backbone.spatial, model(x).backbone.spatial
    assert not torch.allclose(first, second)  # same input, two steps: two crops
    assert model.backbone.cpe_state[1] == 2
    model.eval()
    assert torch.equal(model(x).backbone.spatial, model(x).backbone.spatial)
    whole = resample_abs_pos_embed(vit.pos_embed, new_size=(2, 2), old_size=(8, 8), num_prefix_tokens=0)
    assert torch.allclose(positions(model, 2, 2).reshape(1, 4, -1), whole)  # eval: timm's resampling of the grid
    for side in (32, 48):  # shapes at two resolutions, both modes
        for train in (True, False):
            model.train(train)
            out = model(torch.randn(2, 3, side, side))
            assert out.backbone.spatial.shape == (2, vit.embed_dim, side // 16, side // 16)
            assert out.teachers["clip"].spatial.shape == (2, 64, side // 16, side // 16)


def test_a_training_crop_is_a_resized_window_of_the_grid():
    """On a grid whose first channel is its column index, a crop's first channel rises by the same step
    across every row (a window resized), within the grid's range, and another forward picks another window."""
    model = cpe_student().train()
    with torch.no_grad():
        model.backbone.model.pos_embed.zero_()[0, :, 0] = torch.arange(8.0).repeat(8)  # column index of 8x8
    crops = [positions(model, 4, 6)[..., 0] for _ in range(2)]  # (4, 6) each
    for crop in crops:
        steps = crop[:, 1:] - crop[:, :-1]
        assert torch.allclose(steps, steps[0, 1].expand_as(steps), atol=1e-5) and steps[0, 1] > 0
        assert crop.min() >= 0 and crop.max() <= 7
    assert not torch.allclose(crops[0], crops[1])


def test_crops_are_seeded_and_continue_after_save_and_load(tmp_path):
    a, b = cpe_student().train(), cpe_student().train()
    assert torch.equal(positions(a, 3, 3), positions(b, 3, 3))  # same seed, same crops
    save_student(a, tmp_path / "s")
    loaded = load_student(tmp_path / "s").train()
    assert loaded.overrides == {"cpe_size": 128} and loaded.backbone.cpe_state.tolist() == a.backbone.cpe_state.tolist()
    assert torch.equal(positions(loaded, 3, 3), positions(a, 3, 3))  # the next crop, on both
    assert not torch.equal(positions(cpe_student().train(), 3, 3), positions(a, 3, 3))


@pytest.mark.parametrize("size, want", [(100, "16, the patch size of 'test_vit'"), (8, "16"), (0, "the patch size"),
                                        (True, "the patch size"), ("512", "the patch size")])
def test_a_cpe_size_off_the_patch_grid_is_one_line(size, want):
    with pytest.raises(RadioDistillError, match=rf"student override cpe_size={size!r}: must be a multiple of {want}"):
        create_student("test_vit", teachers=TEACHERS, cpe_size=size)
