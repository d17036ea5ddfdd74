"""Hugging Face export: the real transformers loads the folder offline, with no code of this package, and
gives the student's outputs behind RADIO's interface."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.student.hf import export_hf

TEACHERS = {"clip": TeacherDims(32, 64), "dinov2": TeacherDims(48, 48),
            "sam": TeacherDims(None, 32, upsample=2)}  # a head drawing 2 x 2 tokens too

# a fresh interpreter: transformers, offline, loads the folder; its outputs and interface go to files
LOAD_WITH_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoModel
folder, x_file, out_file = sys.argv[1:]
model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
assert not any(info.values()), info  # no missing, unexpected or mismatched weight
x = torch.load(x_file)
with torch.no_grad():
    nlc, nchw = model(x), model(x, feature_fmt="NCHW")
    conditioner = model.make_preprocessor_external()
    external = model(conditioner(x))
torch.save({"nlc": {k: tuple(v) for k, v in nlc.items()}, "nchw": {k: tuple(v) for k, v in nchw.items()},
            "external": {k: tuple(v) for k, v in external.items()}}, out_file)
print(json.dumps({"type": type(model).__name__, "training": model.training, "patch_size": model.patch_size,
                  "min_resolution_step": model.min_resolution_step,
                  "preferred_resolution": list(model.preferred_resolution),
                  "nearest": list(model.get_nearest_supported_resolution(100, 37)),
                  "package": sorted(m for m in sys.modules if m.startswith("radio_distill"))}))
"""


def _non_trivial_batchnorm(model, size):
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, *size) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name,overrides,size,expect", [
    ("test_vit", {"num_registers": 2}, (64, 96), (16, 16, [96, 32])),
    ("test_vit", {"cpe_size": 128}, (64, 96), (16, 16, [96, 32])),
    ("test_coatnet", {}, (160, 160), (32, 32, [96, 32])),  # timm buffers the weights file does not hold
    ("test_eradio", {}, (64, 160), (16, 32, [96, 32])),
    ("test_vitdet", {}, (64, 80), (16, 16, [96, 32])),  # timm's VisionTransformerSAM, windows padded
], ids=["vit", "vit-cpe", "cnn", "eradio", "vitdet"])
@pytest.mark.slow
def test_transformers_loads_the_folder_offline(name, overrides, size, expect, tmp_path):
    torch.manual_seed(0)
    model = _non_trivial_batchnorm(create_student(name, teachers=TEACHERS, **overrides), size)
    model.preferred_resolution = 96 if name != "test_coatnet" else 160
    save_student(model, tmp_path / "run" / "student")
    config = export_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                   "modeling_radio_student.py"]
    assert config["auto_map"]["AutoModel"] == "modeling_radio_student.RadioStudentModel"
    source = (tmp_path / "hf" / "modeling_radio_student.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+(radio_distill|\.)", source, re.M)  # no import of this package

    x = torch.rand(2, 3, *size)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(tmp_path / "hf"), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    interface = json.loads(done.stdout.strip().splitlines()[-1])
    patch, step, nearest = expect
    assert interface == {"type": "RadioStudentModel", "training": False, "patch_size": patch,
                         "min_resolution_step": step, "preferred_resolution": [model.preferred_resolution] * 2,
                         "nearest": nearest, "package": []}
    got = torch.load(tmp_path / "y.pt")

    reference = load_student(tmp_path / "run", radio=True)
    for fmt in ("NLC", "NCHW"):
        with torch.no_grad():
            want = reference(x, feature_fmt=fmt)
        assert list(got[fmt.lower()]) == ["backbone", "clip", "dinov2", "sam"]
        for key, (summary, features) in want.items():
            s, f = got[fmt.lower()][key]
            assert f.shape == features.shape and torch.allclose(f, features, atol=1e-5), (fmt, key)
            assert (s is None) if summary is None else torch.allclose(s, summary, atol=1e-5), (fmt, key)
    for key, (summary, features) in got["external"].items():  # the normalisation handed out, same result
        assert torch.allclose(features, got["nlc"][key][1], atol=1e-6)

    again = load_student(tmp_path / "hf", radio=True)  # the folder is a saved student too
    with torch.no_grad():
        assert torch.equal(again(x)["clip"].features, reference(x)["clip"].features)


def test_refusals(tmp_path):
    save_student(create_student("test_vit", teachers=TEACHERS), tmp_path / "student")
    with pytest.raises(RadioDistillError, match="--feature-fmt 'NHWC'"):
        export_hf(tmp_path / "student", tmp_path / "hf", feature_fmt="NHWC")
    with pytest.raises(RadioDistillError, match="neither a run folder nor a saved student"):
        export_hf(tmp_path / "nothing", tmp_path / "hf")
