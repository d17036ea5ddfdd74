"""torch.hub: `torch.hub.load(CLONE, 'student', source='local', run=RUN)` gives the student behind RADIO's interface."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.student.radio import RadioStudent, Resolution

REPO = Path(__file__).resolve().parents[2]  # the clone: its folder is the package, hubconf.py at its top
TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}

# a fresh interpreter that has not imported the package: hubconf imports it from the clone
LOAD_WITH_HUB = """
import json, sys, torch
repo, run, x_file, y_file = sys.argv[1:]
model = torch.hub.load(repo, "student", source="local", run=run, feature_fmt="NCHW")
with torch.no_grad():
    torch.save({k: tuple(v) for k, v in model(torch.load(x_file)).items()}, y_file)
import radio_distill
print(json.dumps({"package": radio_distill.__file__, "type": type(model).__name__,
                  "preferred": list(model.preferred_resolution)}))
"""


@pytest.fixture
def run(tmp_path) -> Path:
    torch.manual_seed(0)
    student = create_student("test_vit", teachers=TEACHERS)
    student.preferred_resolution = 64
    save_student(student, tmp_path / "run" / "student")
    return tmp_path / "run"


def test_hub_loads_from_a_fresh_interpreter(run, tmp_path):
    x = torch.rand(2, 3, 64, 48)
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_HUB, str(REPO), str(run), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info == {"package": str(REPO / "__init__.py"), "type": "RadioStudent", "preferred": [64, 64]}
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        want = load_student(run, radio=True)(x, feature_fmt="NCHW")
    assert list(got) == ["backbone", "clip", "sam"]
    for key, (summary, features) in want.items():
        assert torch.equal(got[key][1], features) and features.shape[-2:] == (4, 3)
        assert (got[key][0] is None) if summary is None else torch.equal(got[key][0], summary)


def test_hub_in_this_process(run):
    model = torch.hub.load(str(REPO), "student", source="local", run=run)
    assert isinstance(model, RadioStudent) and model.preferred_resolution == Resolution(64, 64)
    assert model.get_nearest_supported_resolution(70, 70) == Resolution(64, 64)
    assert model(torch.rand(1, 3, 32, 32))["clip"].features.shape == (1, 4, 64)  # NLC by default
    with pytest.raises(ValueError, match="feature_fmt 'nchw'"):
        torch.hub.load(str(REPO), "student", source="local", run=run, feature_fmt="nchw")
