"""Multi-resolution training from one store: one side trains exactly as before, 'random' gives each
step one side, 'partition' each step one part per side that trains as one batch would."""

import copy
import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from radio_distill.cli import train_app
from radio_distill.errors import TrainingError
from radio_distill.student import TeacherDims, create_student, load_student
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader, StepSampler
from radio_distill.train.step import DistillStep

from .conftest import config

# radio-train's first 3 steps on the shared tiny store (test_vit, side 32, batch 8, seed 0), logged by the
# commit before multi-resolution training (35486af), logged again when the sampler's epochs became a Feistel
# permutation and again when they became a permutation of the done shards' rows with unusable ones redrawn (issue
# 21: other batches, same code path): one side must still give exactly these
BEFORE = [
    {"clip/summary": 1.0752217769622803, "clip/spatial": 0.9689106941223145, "dinov2/summary": 1.1460936069488525,
     "dinov2/spatial": 0.9508222937583923, "sam/spatial": 0.9719216823577881, "loss": 5.112970352172852,
     "grad_norm": 35.266685485839844},
    {"clip/summary": 0.48849448561668396, "clip/spatial": 0.9372815489768982, "dinov2/summary": 0.7053026556968689,
     "dinov2/spatial": 0.8914275765419006, "sam/spatial": 0.8459227681159973, "loss": 3.868428945541382,
     "grad_norm": 7.295198917388916},
    {"clip/summary": 0.3271228075027466, "clip/spatial": 0.782340943813324, "dinov2/summary": 0.39969146251678467,
     "dinov2/spatial": 0.7838403582572937, "sam/spatial": 0.6493706703186035, "loss": 2.942366123199463,
     "grad_norm": 3.7486674785614014},
]


def read_metrics(run) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def spy_parts(monkeypatch) -> list:
    """Records the pixel shapes of every step's parts."""
    seen, update = [], DistillStep.update_parts
    monkeypatch.setattr(DistillStep, "update_parts",
                        lambda self, parts: seen.append([tuple(p.shape) for p, _ in parts]) or update(self, parts))
    return seen


def test_one_side_trains_exactly_as_before(train_store, tmp_path, monkeypatch):
    seen = spy_parts(monkeypatch)
    cfg = config(train_store, tmp_path / "run", steps=3, resolution=[32], batch_size=[8])
    assert (cfg.resolution, cfg.batch_size) == (32, 8)
    train(cfg, progress=False)
    assert seen == [[(8, 3, 32, 32)]] * 3
    for row, before in zip(read_metrics(tmp_path / "run"), BEFORE, strict=True):
        for key, value in before.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (row["step"], key)


def test_random_policy_trains_each_step_at_the_side_the_sampler_drew(train_store, tmp_path, monkeypatch):
    seen = spy_parts(monkeypatch)
    cfg = config(train_store, tmp_path / "run", steps=6, resolution=[32, 48, 64])
    train(cfg, progress=False)
    drawn = StepSampler([0], views=1, resolution=cfg.resolution, batch_size=8, seed=cfg.seed, start_step=0, steps=6)
    assert [[p[-1] for p in parts] for parts in seen] == [[drawn.parts(s)[0][0]] for s in range(6)]
    assert {p[0][-1] for p in seen} == {32, 48, 64} and all(p[0][0] == 8 for p in seen)
    assert all(np.isfinite(list(r.values())).all() for r in read_metrics(tmp_path / "run"))


def test_partition_trains_every_side_each_step_and_resume_needs_the_same_set(train_store, tmp_path, monkeypatch):
    seen = spy_parts(monkeypatch)
    run = tmp_path / "run"
    kw = dict(steps=4, resolution=[32, 64], batch_size=[6, 2], resolution_policy="partition")
    train(config(train_store, run, stop_at=2, **kw), progress=False)
    assert seen == [[(6, 3, 32, 32), (2, 3, 64, 64)]] * 2
    saved = json.loads((run / "run.json").read_text())["config"]
    assert (saved["resolution"], saved["batch_size"], saved["resolution_policy"]) == ([32, 64], [6, 2], "partition")
    with pytest.raises(TrainingError, match=r"started with resolution=\[32, 64\]; an exact resume needs"):
        train(config(train_store, run, resume=True, **{**kw, "resolution": [32, 48]}), progress=False)
    train(config(train_store, run, resume=True, **kw), progress=False)
    assert len(seen) == 4 and [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_the_command_line_takes_sides_batch_sizes_and_policy(train_store, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(out), "--steps", "1",
                                            "--resolution", "32,48", "--resolution-policy", "partition",
                                            "--batch-size", "4,2", "--workers", "0", "--holdout", "0.1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run.json").read_text())["config"]
    assert (saved["resolution"], saved["batch_size"], saved["resolution_policy"]) == ([32, 48], [4, 2], "partition")


def test_partition_parts_of_side_sets_draw_their_side_each_step_and_resume_exactly(train_store, tmp_path,
                                                                                     monkeypatch):
    """C-RADIOv4's low and high partitions: every step one part per set, its side drawn from that set."""
    seen = spy_parts(monkeypatch)
    run, whole = tmp_path / "run", tmp_path / "whole"
    kw = dict(steps=4, resolution=[[32, 48], [64, 80, 96]], batch_size=[6, 2], resolution_policy="partition")
    train(config(train_store, whole, **kw), progress=False)
    assert all(p[0][0] == 6 and p[0][-1] in (32, 48) and p[1][0] == 2 and p[1][-1] in (64, 80, 96) for p in seen)
    drawn = StepSampler([0], views=1, resolution=((32, 48), (64, 80, 96)), batch_size=(6, 2), seed=0, start_step=0,
                        steps=4, policy="partition")
    assert [[p[-1] for p in parts] for parts in seen] == [[s for s, _ in drawn.parts(k)] for k in range(4)]
    assert len({p[1][-1] for p in seen}) > 1  # the high part's side changes
    train(config(train_store, run, stop_at=2, **kw), progress=False)
    train(config(train_store, run, resume=True, **kw), progress=False)
    timeless = [[{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(r)] for r in (run, whole)]
    assert timeless[0] == timeless[1]
    saved = json.loads((run / "run.json").read_text())["config"]
    assert saved["resolution"] == [[32, 48], [64, 80, 96]]
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(tmp_path / "cli"),
                                            "--steps", "1", "--resolution", "32/48,64", "--batch-size", "4",
                                            "--workers", "0", "--holdout", "0.1"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "error: --resolution 32/48,64: sets of sides (a/b) are the parts of --resolution-policy partition, e.g. "
        "--resolution 128/256,512/1024 --batch-size 64,16")


def test_parts_at_one_side_train_and_report_as_one_batch(train_store):
    """A batch split in two parts (5 + 3 samples) gives the metrics and the update of the whole batch."""
    reader = CacheReader(train_store)
    batch = next(iter(reader.loader(reader.indices(holdout=0.1), resolution=32, batch_size=8, seed=0, start_step=0,
                                    steps=1, workers=0)))
    torch.manual_seed(0)
    model = create_student("test_vit", teachers={t.name: TeacherDims(t.summary_dim, t.spatial_dim)
                                                 for t in reader.teachers})
    twin = copy.deepcopy(model)
    # plain SGD: the update is the gradient (Adam's first step is about lr * sign, which hides it)
    steps = [DistillStep(m, torch.optim.SGD(m.parameters(), lr=1.0), reader.teachers, loss=config(0, 0).loss,
                         grad_clip=1.0, device=torch.device("cpu")) for m in (model, twin)]
    whole = steps[0](batch)
    parts = steps[1]({k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()})
    assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(model.state_dict()["backbone.model.pos_embed"],
                           create_student("test_vit", teachers=model.teachers).state_dict()["backbone.model.pos_embed"])


def test_a_cpe_student_at_random_sides_resumes_exactly(train_store, tmp_path):
    """The CPE crops and the sides drawn continue after --resume as in an uninterrupted run."""
    kw = dict(steps=4, resolution=[32, 48], student_overrides={"cpe_size": 128}, checkpoint_every=2)
    train(config(train_store, tmp_path / "full", **kw), progress=False)
    train(config(train_store, tmp_path / "part", stop_at=2, **kw), progress=False)
    train(config(train_store, tmp_path / "part", resume=True, **kw), progress=False)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in BEFORE[0]:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    saved = json.loads((tmp_path / "full/student/config.json").read_text())
    assert saved["overrides"] == {"cpe_size": 128}


def test_a_vitdet_student_trains_from_the_cache_at_two_sides(train_store, tmp_path, monkeypatch):
    """Windowed attention at a side of whole windows (64: 4x4 tokens, windows of 2) and a padded one (48: 3x3)."""
    seen = spy_parts(monkeypatch)
    run = tmp_path / "run"
    train(config(train_store, run, student="test_vitdet", steps=3, resolution=[48, 64], batch_size=[4, 4],
                 resolution_policy="partition"), progress=False)
    assert seen == [[(4, 3, 48, 48), (4, 3, 64, 64)]] * 3
    rows = read_metrics(run)
    assert len(rows) == 3 and all(np.isfinite(list(r.values())).all() for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    student = load_student(run)
    assert student.name == "test_vitdet" and student.preferred_resolution == 64
    with torch.no_grad():
        assert student(torch.randn(1, 3, 80, 48)).teachers["clip"].spatial.shape[-2:] == (5, 3)
