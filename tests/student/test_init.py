"""Starting a student from a trained one with other teachers: what comes over, row by row."""

import pytest
import torch
from safetensors.torch import save_file

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, save_student
from radio_distill.student.init import init_line, init_source, init_student

OLD = {"extra": TeacherDims(10, 12), "clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}
NEW = {"clip": TeacherDims(32, 64), "dinov2": TeacherDims(48, 48), "sam": TeacherDims(None, 32)}


def _student(name, teachers, seed, **overrides):
    torch.manual_seed(seed)
    return create_student(name, teachers=teachers, **overrides)


def test_vit_backbone_tokens_follow_their_teachers(tmp_path):
    old = _student("test_vit", OLD, 1, num_registers=2)  # prefix: extra, clip, r0, r1
    save_student(old, tmp_path / "old")
    model = _student("test_vit", NEW, 2, num_registers=3)  # prefix: clip, dinov2, r0, r1, r2
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = init_student(model, tmp_path / "old")
    assert report == {"from": str(tmp_path / "old"), "kept": ["clip/summary", "clip/spatial", "sam/spatial"],
                      "new": ["dinov2/summary", "dinov2/spatial"], "dropped": ["extra"]}
    assert init_line(report) == (f"--init {tmp_path / 'old'}: backbone, heads clip/summary, clip/spatial, sam/spatial; "
                                 "new heads: dinov2/summary, dinov2/spatial; dropped teachers: extra")
    a, b = old.state_dict(), model.state_dict()
    for key in b:
        if key.startswith("backbone.") and not key.endswith(("reg_token", "pos_embed")):
            assert torch.equal(b[key], a[key]), key
    for key in ("backbone.model.reg_token", "backbone.model.pos_embed"):  # prefix rows: clip, dinov2, 3 registers
        want = [a[key][:, 1], fresh[key][:, 1], a[key][:, 2], a[key][:, 3], fresh[key][:, 4]]
        for i, row in enumerate(want):
            assert torch.equal(b[key][:, i], row), (key, i)
    assert torch.equal(b["backbone.model.pos_embed"][:, 5:], a["backbone.model.pos_embed"][:, 4:])  # patch rows
    for key in b:
        if key.startswith(("summary_heads.clip.", "spatial_heads.clip.", "spatial_heads.sam.")):
            assert torch.equal(b[key], a[key]), key
        elif key.startswith(("summary_heads.dinov2.", "spatial_heads.dinov2.")):
            assert torch.equal(b[key], fresh[key]), key


@pytest.mark.parametrize("name", ["test_eradio", "test_resnet"])
def test_same_teachers_give_the_same_model(name, tmp_path):
    old = _student(name, NEW, 1)
    with torch.no_grad():  # BatchNorm statistics come over too
        old(torch.randn(4, 3, 64, 64))
    save_student(old.eval(), tmp_path / "old")
    model = _student(name, NEW, 2)
    report = init_student(model, tmp_path / "old" / "model.safetensors")  # the weights file names it too
    assert report["new"] == [] and report["dropped"] == []
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want, got = old(x), model.eval()(x)
    for t in NEW:
        assert torch.equal(got.teachers[t].spatial, want.teachers[t].spatial)


def test_a_head_whose_shape_changed_is_new(tmp_path):
    save_student(_student("test_eradio", {**NEW, "clip": TeacherDims(16, 64)}, 1), tmp_path / "old")
    report = init_student(_student("test_eradio", NEW, 2), tmp_path / "old")
    assert report["kept"] == ["clip/spatial", "dinov2/summary", "dinov2/spatial", "sam/spatial"]
    assert report["new"] == ["clip/summary"]


def test_a_stopped_run_starts_from_its_checkpoint(tmp_path):
    save_student(_student("test_resnet", NEW, 1), tmp_path / "run" / "checkpoint" / "student")
    assert init_source(tmp_path / "run")[1] == tmp_path / "run" / "checkpoint" / "student" / "model.safetensors"


def test_refusals_name_the_problem(tmp_path):
    save_student(_student("test_vit", NEW, 1), tmp_path / "vit")
    with pytest.raises(RadioDistillError, match=r"holds a 'test_vit' student, this run trains 'test_resnet'"):
        init_student(_student("test_resnet", NEW, 2), tmp_path / "vit")
    with pytest.raises(RadioDistillError, match=r"its backbone does not fit this 'test_vit' \(backbone.model.blocks"):
        init_student(_student("test_vit", NEW, 2, depth=2), tmp_path / "vit")
    with pytest.raises(RadioDistillError, match=r"backbone.model.blocks.0.attn.proj.bias is \(64,\) there, "
                                                r"\(32,\) here; give the student overrides it was trained with"):
        init_student(_student("test_vit", NEW, 2, embed_dim=32), tmp_path / "vit")
    save_file({"x": torch.zeros(1)}, tmp_path / "loose.safetensors")
    with pytest.raises(RadioDistillError, match="a file must be a student's .safetensors weights with its config.json"):
        init_student(_student("test_vit", NEW, 2), tmp_path / "loose.safetensors")
    with pytest.raises(RadioDistillError, match="--init: .* is neither a run folder nor a saved student"):
        init_student(_student("test_vit", NEW, 2), tmp_path / "nothing")
