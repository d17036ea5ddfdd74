"""RADIO's interface on a loaded student: pixels in [0, 1], (summary, features) per adaptor, resolutions."""

import pytest
import torch

from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.student.radio import RadioOutput, RadioStudent, Resolution

TEACHERS = {"clip": TeacherDims(32, 64), "sam": TeacherDims(None, 32)}


@pytest.mark.parametrize("name,patch,step,preferred", [("test_vit", 16, 16, 160), ("test_resnet", 32, 32, 160),
                                                        ("test_eradio", 16, 32, 224)])
def test_interface_matches_the_student_on_normalised_pixels(name, patch, step, preferred, tmp_path):
    torch.manual_seed(0)
    save_student(create_student(name, teachers=TEACHERS), tmp_path)
    model = load_student(tmp_path, radio=True)
    assert isinstance(model, RadioStudent) and not model.training
    assert (model.patch_size, model.min_resolution_step) == (patch, step)
    assert model.preferred_resolution == Resolution(preferred, preferred)  # untrained: the backbone's default side
    assert model.adaptor_names == ["clip", "sam"]

    x = torch.rand(2, 3, 64, 96)
    mean, std = torch.tensor(model.student.mean).view(1, 3, 1, 1), torch.tensor(model.student.std).view(1, 3, 1, 1)
    with torch.no_grad():
        out, nchw = model(x), model(x, feature_fmt="NCHW")
        ref = model.student((x - mean) / std)
    assert list(out) == ["backbone", "clip", "sam"] and all(isinstance(v, RadioOutput) for v in out.values())
    h, w = 64 // patch, 96 // patch
    assert out["backbone"].features.shape == (2, h * w, model.embed_dim)
    assert out["clip"].summary.shape == (2, 32) and out["sam"].summary is None
    for name, want in [("backbone", ref.backbone), *ref.teachers.items()]:
        assert torch.allclose(nchw[name].features, want.spatial, atol=1e-6)
        assert torch.equal(out[name].features, nchw[name].features.flatten(2).transpose(1, 2))
        assert (want.summary is None) == (out[name].summary is None)
        if want.summary is not None:
            assert torch.allclose(out[name].summary, want.summary, atol=1e-6)

    conditioner = model.make_preprocessor_external()  # normalisation outside from now on
    with torch.no_grad():
        assert torch.allclose(model(conditioner(x))["clip"].features, out["clip"].features, atol=1e-6)
    with pytest.raises(ValueError, match="feature_fmt 'NHWC'"):
        model(x, feature_fmt="NHWC")


@pytest.mark.parametrize("size,expected", [((100, 37), (96, 32)), ((8, 8), (16, 16)), ((224, 232), (224, 224)),
                                           ((225, 240), (224, 240))])
def test_nearest_supported_resolution(size, expected):
    model = RadioStudent(create_student("test_vit", teachers=TEACHERS))
    assert model.get_nearest_supported_resolution(*size) == Resolution(*expected)


def test_preferred_resolution_is_the_trained_side(tmp_path):
    student = create_student("test_vit", teachers=TEACHERS)
    student.preferred_resolution = 96
    save_student(student, tmp_path)
    assert load_student(tmp_path).preferred_resolution == 96
    assert load_student(tmp_path, radio=True).preferred_resolution == Resolution(96, 96)
