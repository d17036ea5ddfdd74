"""`radio-train --init`: a run that starts from a trained student, on a store with other teachers, at other sides."""

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from radio_distill.cli import train_app
from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.train.config import load_train_config
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader

from .conftest import config


def _weights(run):
    return load_file(run / "student" / "model.safetensors")


def test_zero_steps_from_a_run_is_that_run_exactly(train_store, tmp_path):
    train(config(train_store, tmp_path / "a", steps=2, student="test_eradio", resolution=32), progress=False)
    result = CliRunner().invoke(train_app, [str(train_store), "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"),
                                            "--steps", "0", "--resolution", "64", "--batch-size", "8", "--workers", "0",
                                            "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert ": backbone, heads clip/summary, clip/spatial, dinov2/summary, dinov2/spatial, sam/spatial; " \
           "no new heads" in result.output  # no --student: the init's
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["student"] == "test_eradio" and run["init"]["new"] == []
    assert load_student(tmp_path / "b", radio=True).preferred_resolution == (64, 64)


def test_other_teachers_keep_theirs_and_new_ones_start_fresh(train_store, tmp_path):
    dims = {t.name: TeacherDims(t.summary_dim, t.spatial_dim) for t in CacheReader(train_store).teachers}
    torch.manual_seed(7)
    trained = create_student("test_vit", teachers={"siglip": TeacherDims(24, 24), "clip": dims["clip"]},
                             num_registers=4)
    save_student(trained, tmp_path / "trained")
    cfg = load_train_config(store=train_store, out=tmp_path / "zero", init=tmp_path / "trained", steps=0,
                            resolution=32, batch_size=8, workers=0, device="cpu")
    assert (cfg.student, cfg.student_overrides) == ("test_vit", {"num_registers": 4})  # the init's
    result = train(cfg, progress=False)
    assert result["step"] == 0
    got = _weights(tmp_path / "zero")
    torch.manual_seed(cfg.seed)  # the known answer for new heads: the seeded fresh student's
    fresh = create_student("test_vit", teachers=dims, num_registers=4).state_dict()
    before = trained.state_dict()
    for key, value in got.items():
        if key.startswith(("summary_heads.clip.", "spatial_heads.clip.")):
            assert torch.equal(value, before[key]), key
        elif key.startswith(("summary_heads.", "spatial_heads.")):
            assert torch.equal(value, fresh[key]), key
        elif key == "backbone.model.reg_token":  # clip's token was 2nd of the trained prefix, 1st here
            assert torch.equal(value[:, 0], before[key][:, 1]) and torch.equal(value[:, 1], fresh[key][:, 1])
            assert torch.equal(value[:, 2:5], before[key][:, 2:5])
        elif key.startswith("backbone.") and key != "backbone.model.pos_embed":
            assert torch.equal(value, before[key]), key

    # and training continues from there, at two other sides
    more = config(train_store, tmp_path / "more", student="test_vit", student_overrides={"num_registers": 4},
                  init=tmp_path / "trained", steps=3, resolution=(32, 64))
    assert train(more, progress=False)["step"] == 3
    assert json.loads((tmp_path / "more" / "run.json").read_text())["init"]["dropped"] == ["siglip"]
