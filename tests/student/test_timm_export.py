"""A ViT student exported for plain timm: same features with no code of this package."""

import json
import subprocess
import sys

import pytest
import torch

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, export_timm, load_student, save_student

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}

# runs in a fresh interpreter that imports timm and torch only
LOAD_WITH_TIMM = """
import json, sys, torch, timm
spec = json.loads(sys.argv[1])
model = timm.create_model(spec["model"], pretrained=True, pretrained_cfg_overlay=dict(file=sys.argv[2]),
                          **spec["kwargs"]).eval()
x = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model.forward_features(x), sys.argv[4])
print(sorted(m for m in sys.modules if m.startswith("radio_distill")))
"""


@pytest.mark.parametrize("overrides", [{}, {"cpe_size": 128}], ids=["plain", "cpe"])
def test_timm_loads_the_exported_backbone(tmp_path, overrides):
    torch.manual_seed(0)
    student = create_student("test_vit", teachers=TEACHERS, num_registers=2, **overrides)
    run = tmp_path / "run"
    save_student(student, run / "student")
    spec = export_timm(run, tmp_path / "vit.safetensors")  # the run folder, not its student/
    assert spec["model"] == "test_vit" and spec["kwargs"]["reg_tokens"] == 1 + 2

    x = torch.randn(2, 3, 64, 96)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM, json.dumps(spec), str(tmp_path / "vit.safetensors"),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # nothing of this package was imported
    tokens = torch.load(tmp_path / "y.pt")  # (B, P + h * w, D)

    with torch.no_grad():
        summary, spatial = load_student(run).forward_features(x)
    patches = spatial.flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 3 + 4 * 6, spatial.shape[1])
    cos_patches = torch.nn.functional.cosine_similarity(tokens[:, 3:], patches, dim=-1)
    cos_summary = torch.nn.functional.cosine_similarity(tokens[:, :1], summary, dim=-1)
    assert cos_patches.min() >= 0.9999 and cos_summary.min() >= 0.9999


def test_timm_loads_an_exported_vitdet(tmp_path):
    """A ViTDet student exports as timm's VisionTransformerSAM: the same map, at a side padded to whole windows."""
    torch.manual_seed(0)
    student = create_student("test_vitdet", teachers=TEACHERS, window_size=3)
    save_student(student, tmp_path / "student")
    spec = json.loads(json.dumps(export_timm(tmp_path / "student", tmp_path / "vitdet.safetensors")))  # as printed
    assert spec == {"model": "samvit_base_patch16", "kwargs": {
        "num_classes": 0, "global_pool": "", "patch_size": 16, "window_size": 3, "img_size": 128, "use_rel_pos": False,
        "neck_chans": 0, "embed_dim": 64, "depth": 4, "num_heads": 2, "global_attn_indexes": [1, 3]}}

    x = torch.randn(2, 3, 64, 112)  # 4x7 tokens: padded to 6x9, 2x3 windows of 3
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TIMM, json.dumps(spec), str(tmp_path / "vitdet.safetensors"),
                           str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # nothing of this package was imported
    with torch.no_grad():
        summary, spatial = load_student(tmp_path / "student").forward_features(x)
    assert torch.equal(torch.load(tmp_path / "y.pt"), spatial)  # (B, D, h, w) the same computation
    assert torch.allclose(summary[:, 0], spatial.mean((2, 3)))


def test_only_vit_students_export(tmp_path):
    save_student(create_student("test_convnext", teachers=TEACHERS), tmp_path / "student")
    with pytest.raises(RadioDistillError, match="not a timm ViT"):
        export_timm(tmp_path, tmp_path / "x.safetensors")


def test_load_student_names_a_folder_that_is_neither(tmp_path):
    with pytest.raises(RadioDistillError, match="neither a run folder nor a saved student"):
        load_student(tmp_path)
