"""`radio-export RUN OUT --format onnx|hf|timm`: thin wiring to the export functions, errors in one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from radio_distill.cli import export_app
from radio_distill.student import TeacherDims, create_student, save_student

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    for name in ("test_vit", "test_resnet"):
        student = create_student(name, teachers=TEACHERS)
        student.preferred_resolution = 64
        save_student(student, root / name / "student")
    return root


def test_onnx_at_the_trained_side_by_default(runs, tmp_path):
    result = CliRunner().invoke(export_app, [str(runs / "test_resnet"), str(tmp_path / "onnx"), "--feature-fmt", "NCHW"])
    assert result.exit_code == 0, result.output
    assert "64: student_64.onnx" in result.output and "outputs backbone.summary, backbone.features" in result.output
    manifest = json.loads((tmp_path / "onnx" / "onnx.json").read_text())
    assert manifest["sides"] == {"64": "student_64.onnx"} and manifest["feature_fmt"] == "NCHW"


def test_hf_and_timm(runs, tmp_path):
    result = CliRunner().invoke(export_app, [str(runs / "test_vit"), str(tmp_path / "hf"), "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["feature_fmt"] == "NLC"
    result = CliRunner().invoke(export_app, [str(runs / "test_vit"), str(tmp_path / "vit.safetensors"), "-f", "timm"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "test_vit" and (tmp_path / "vit.safetensors").is_file()


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite"], "error: --format 'tflite': choose from onnx, hf, timm"),
    (["--format", "hf", "--sides", "64"], "error: --sides is for --format onnx; a hf export takes any side"),
    (["--sides", "64,70"], "error: --sides 70: student 'test_vit' takes sides that are multiples of 16, e.g. 64"),
    (["--sides", "big"], "error: --sides 'big': expected whole numbers separated by commas"),
])
def test_refusals_are_one_line(runs, tmp_path, args, message):
    result = CliRunner().invoke(export_app, [str(runs / "test_vit"), str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output.replace("\n", " "), result.output
