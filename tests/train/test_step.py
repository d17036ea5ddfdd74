"""The distillation step the loop and the benchmarks share, the pixel normalisation inside it, and how
often the loop waits for the device."""

import csv
import json

import numpy as np
import pytest
import torch
import zarr

from radio_distill.store import layout as L
from radio_distill.errors import TrainingError
from radio_distill.ops import normalise
from radio_distill.student import TeacherDims, create_student
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader
from radio_distill.train.step import DistillStep, make_optimizer

from .conftest import config
from .test_reader import first_drawn


def test_normalise_known_answer():
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalise(pixels, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    assert out.dtype == torch.float32 and torch.allclose(out[:, :, 0, 0], torch.tensor([-1.0, 2.0, 0.0]))
    floats = pixels.float()
    normalise(floats, (0.5,) * 3, (0.5,) * 3)
    assert torch.equal(floats, pixels.float())  # the caller's tensor is left alone


def test_the_loop_runs_the_public_step(train_store, tmp_path):
    """Step 1 of `radio-train` logs exactly what `DistillStep` gives on its first batch."""
    cfg = config(train_store, tmp_path / "run", steps=1)
    train(cfg, progress=False)
    with (tmp_path / "run/metrics.csv").open() as f:
        logged = next(csv.DictReader(f))
    reader = CacheReader(train_store)
    batch = next(iter(reader.loader(reader.indices(holdout=cfg.holdout), resolution=cfg.resolution,
                                    batch_size=cfg.batch_size, seed=cfg.seed, start_step=0, steps=1, workers=0)))
    torch.manual_seed(cfg.seed)
    dims = {t.name: TeacherDims(t.summary_dim, t.spatial_dim) for t in reader.teachers}
    model = create_student(cfg.student, teachers=dims)
    step = DistillStep(model, make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay), reader.teachers,
                       loss=cfg.loss, grad_clip=cfg.grad_clip, device=torch.device("cpu"))
    values = dict(zip(step.names, step(batch).tolist()))
    assert set(values) == set(logged) - {"step", "lr", "images_per_s"}
    for name, value in values.items():
        assert float(logged[name]) == pytest.approx(value, rel=1e-6), name


def test_the_loop_waits_for_the_device_once_per_log_and_never_checkpoints_a_bad_step(store_copy, tmp_path,
                                                                                     monkeypatch, record_again):
    reader = CacheReader(store_copy)
    i, v, bad = first_drawn(reader, after=4)
    synced = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: synced.append(t.shape) or tolist(t))
    train(config(store_copy, tmp_path / "ok", steps=8, log_every=4, checkpoint_every=1000), progress=False)
    assert len(synced) == 2  # steps 4 and 8, not every step

    summary = zarr.open_group(store_copy, mode="r+")[L.target_array("dinov2", "summary")]
    summary[i, v] = np.full(summary.shape[2:], np.nan, np.float16)
    record_again(store_copy, L.target_array("dinov2", "summary"))  # a teacher that output NaN
    run, every = tmp_path / "nan", bad - bad % 2  # a checkpoint at `every`, the next check after `bad`
    with pytest.raises(TrainingError, match=rf"teacher 'dinov2' \(dinov2/summary\) is not finite at step {bad};"):
        train(config(store_copy, run, steps=every + 4, log_every=2, checkpoint_every=2), progress=False)
    assert json.loads((run / "checkpoint/state.json").read_text())["step"] == every


class _Fixed(torch.nn.Module):
    """A 'student' whose outputs are given: the step's losses can then be computed by hand."""
    mean, std = (0.0,) * 3, (1.0,) * 3

    def __init__(self, outputs: dict):
        super().__init__()
        self.outputs, self.p = outputs, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        from types import SimpleNamespace
        return SimpleNamespace(teachers={k: SimpleNamespace(summary=s, spatial=f) for k, (s, f) in self.outputs.items()})


@pytest.mark.parametrize("kind", ["phis", "amradio"])
def test_the_total_loss_of_a_step_by_hand(kind):
    """Teacher a: summary 1 - cos([1, 0], [0, 1]) = 1; spatial token [1, 2] vs [3, 2], PHI-S scale = mean
    eigenvalue of diag(4, 4) = 4. Teacher b: spatial [0, 0] vs [1, 3], scale of diag(1, 9) = 5."""
    from radio_distill.train.losses import LossConfig
    from radio_distill.store.reader import TeacherMeta
    from radio_distill.train.step import total_loss

    teachers = [TeacherMeta("a", 2, 2, (1, 1), (), {"spatial": {"mean": np.zeros(2), "cov": np.diag([4.0, 4.0])}}),
                TeacherMeta("b", None, 2, (1, 1), (), {"spatial": {"mean": np.zeros(2), "cov": np.diag([1.0, 9.0])}})]
    model = _Fixed({"a": (torch.tensor([[1.0, 0.0]]), torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)),
                    "b": (None, torch.zeros(1, 2, 1, 1))})
    targets = {"a": {"summary": torch.tensor([[0.0, 1.0]]), "spatial": torch.tensor([3.0, 2.0]).view(1, 1, 1, 2)},
               "b": {"summary": None, "spatial": torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)}}
    loss = LossConfig(kind=kind, summary_weight=3.0, spatial_weight=0.25, teacher_weights={"a": 2.0, "b": 0.5})
    step = DistillStep(model, make_optimizer(model, lr=0.1, weight_decay=0.0), teachers, loss=loss, grad_clip=1.0,
                       device=torch.device("cpu"))
    losses, total = step._losses(torch.zeros(1, 3, 2, 2), targets)
    if kind == "phis":  # MSE / scale: ((1-3)² + 0) / 2 / 4 and ((0-1)² + (0-3)²) / 2 / 5
        expected = [1.0, 0.5, 1.0]
    else:  # 0.9 (1 - cos) + 0.1 SmoothL1: cos([1, 2], [3, 2]) = 7 / sqrt(65); SmoothL1 of |d| = 2, 0: 1.5, 0
        expected = [1.0, 0.9 * (1 - 7 / 65**0.5) + 0.1 * 0.75, 0.9 * 1 + 0.1 * (0.5 + 2.5) / 2]
    assert [v.item() for v in losses] == pytest.approx(expected, rel=1e-6)
    a_summary, a_spatial, b_spatial = expected
    assert total.item() == pytest.approx(2 * (3 * a_summary + 0.25 * a_spatial) + 0.5 * 0.25 * b_spatial, rel=1e-6)
    named = dict(zip(("a/summary", "a/spatial", "b/spatial"), losses))
    assert total_loss(named, loss, ["b"]).item() == pytest.approx(0.5 * 0.25 * b_spatial, rel=1e-6)  # a not paired
