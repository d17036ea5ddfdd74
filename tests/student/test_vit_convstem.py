"""ViT students with a conv stem: timm's ViT but for the patch embedding, saved and loaded by name."""

import pytest
import torch

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, export_hf, export_timm, load_student, save_student

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


def test_only_the_patch_embedding_differs_from_timms_vit():
    stem = create_student("vit_tiny_convstem_patch16_224", teachers=TEACHERS)
    plain = create_student("vit_tiny_patch16_224", teachers=TEACHERS)
    assert stem.backbone.conv_stem and not plain.backbone.conv_stem
    a = {k: v.shape for k, v in stem.state_dict().items() if ".patch_embed." not in k}
    b = {k: v.shape for k, v in plain.state_dict().items() if ".patch_embed." not in k}
    assert a == b
    strides = [m.stride for m in stem.backbone.model.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 4 + [(1, 1)]  # 16 px patches: four stride-2 convs, then the 1x1 to the width


def test_grid_and_round_trip(tmp_path):
    torch.manual_seed(0)
    student = create_student("vit_tiny_convstem_patch16_224", teachers=TEACHERS).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = student(x)
        assert out.teachers["clip"].spatial.shape == (2, 64, 4, 6) and out.teachers["sam"].spatial.shape == (2, 32, 4, 6)
        save_student(student, tmp_path / "student")
        again = load_student(tmp_path / "student")(x)
    for t in TEACHERS:
        torch.testing.assert_close(again.teachers[t].spatial, out.teachers[t].spatial)
    torch.testing.assert_close(again.teachers["clip"].summary, out.teachers["clip"].summary)


def test_exports_plain_timm_cannot_build_are_refused_in_one_line(tmp_path):
    save_student(create_student("vit_tiny_convstem_patch16_224", teachers=TEACHERS), tmp_path / "student")
    with pytest.raises(RadioDistillError, match="conv stem, which plain timm cannot build") as e:
        export_timm(tmp_path / "student", tmp_path / "vit.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "vit.safetensors").exists()
    with pytest.raises(RadioDistillError, match="conv stem") as e:
        export_hf(tmp_path / "student", tmp_path / "hf")
    assert "\n" not in str(e.value)


def test_a_patch_size_the_stem_cannot_make_is_one_line():
    with pytest.raises(RadioDistillError, match="patch_size=14: a conv stem needs a power-of-two patch size") as e:
        create_student("vit_tiny_convstem_patch16_224", teachers=TEACHERS, patch_size=14)
    assert "\n" not in str(e.value)
