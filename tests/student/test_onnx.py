"""ONNX export: onnxruntime alone (no torch, no radio_distill) gives the PyTorch student's outputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from radio_distill.errors import RadioDistillError
from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.student.onnx import export_onnx

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32, upsample=2)}  # a head drawing 2 x 2 tokens too

# a fresh interpreter with onnxruntime and numpy only: runs every graph of the manifest on its own input
RUN_WITH_ORT = """
import json, sys
import numpy as np
import onnxruntime as ort
folder = sys.argv[1]
manifest = json.load(open(folder + "/onnx.json"))
results = {}
for side, file in manifest["sides"].items():
    session = ort.InferenceSession(folder + "/" + file, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [manifest["input"]["name"]]
    assert [o.name for o in session.get_outputs()] == manifest["outputs"]
    x = np.load(folder + "/x_" + side + ".npy")
    for name, value in zip(manifest["outputs"], session.run(None, {"pixels": x})):
        results[side + "/" + name] = value
np.savez(folder + "/ort.npz", **results)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "radio_distill", "timm")))
"""


def _cosine(a: np.ndarray, b: torch.Tensor) -> float:
    """The smallest per-row cosine of two (B, ...) arrays, each row flattened."""
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(a).flatten(1), b.flatten(1), dim=-1).min())


@pytest.mark.slow
@pytest.mark.parametrize("name,sides", [("test_vit", (64, 96)), ("test_resnet", (64, 96)),
                                        ("test_eradio", (64, 160)),  # 160: E-RADIO's padded windows
                                        ("test_vitdet", (64, 80)),  # 80: 5 tokens padded to 3 windows of 2
                                        ("vit_tiny_convstem_patch16_224", (64, 96))])  # BatchNorm in the stem
def test_onnxruntime_matches_the_student_at_two_sides(name, sides, tmp_path):
    torch.manual_seed(0)
    model = create_student(name, teachers=TEACHERS)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    model.preferred_resolution = 64
    save_student(model.eval(), tmp_path / "student")
    out = tmp_path / "onnx"
    manifest = export_onnx(tmp_path / "student", out, sides=sides, feature_fmt="NCHW")
    assert manifest["sides"] == {str(s): f"student_{s}.onnx" for s in sides}
    assert manifest["outputs"] == ["backbone.summary", "backbone.features", "clip.summary", "clip.features",
                                   "sam.features"]
    assert json.loads((out / "onnx.json").read_text()) == manifest
    inputs = {}
    for side, batch in zip(sides, (3, 1)):  # exported at batch 2: the batch is dynamic
        inputs[side] = torch.rand(batch, 3, side, side)
        np.save(out / f"x_{side}.npy", inputs[side].numpy())

    done = subprocess.run([sys.executable, "-c", RUN_WITH_ORT, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"  # neither torch nor this package was imported
    ort_out = np.load(out / "ort.npz")

    reference = load_student(tmp_path / "student", radio=True)
    for side, x in inputs.items():
        with torch.no_grad():
            ref = reference(x, feature_fmt="NCHW")
        for key in manifest["outputs"]:
            teacher, part = key.split(".")
            got, want = ort_out[f"{side}/{key}"], getattr(ref[teacher], part)
            assert got.shape == tuple(want.shape), key
            assert _cosine(got, want) >= 0.999, (side, key, _cosine(got, want))


def test_default_side_and_refused_sides(tmp_path):
    model = create_student("test_eradio", teachers=TEACHERS)
    save_student(model, tmp_path / "student")
    with pytest.raises(RadioDistillError, match=r"--sides 100: student 'test_eradio' takes sides that are "
                                                r"multiples of 32, e.g. 96"):
        export_onnx(tmp_path / "student", tmp_path / "onnx", sides=(64, 100))
    with pytest.raises(RadioDistillError, match="--feature-fmt 'NHWC'"):
        export_onnx(tmp_path / "student", tmp_path / "onnx", feature_fmt="NHWC")
    assert not (tmp_path / "onnx").exists()  # refused before anything is written
