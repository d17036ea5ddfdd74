"""The distillation step the loop and the benchmarks share, the pixel normalisation inside it, and how
often the loop waits for the device."""

import contextlib
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
from radio_distill.train.losses import LossConfig
from radio_distill.store.reader import CacheReader, TeacherMeta
from radio_distill.train.step import DistillStep, make_optimizer, total_loss

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
    unweighted = LossConfig(kind=kind, summary_weight=3.0, spatial_weight=0.25, teacher_weights={"a": 2.0})  # b: 1
    assert total_loss(named, unweighted, ["a", "b"]).item() == pytest.approx(
        2 * (3 * a_summary + 0.25 * a_spatial) + 0.25 * b_spatial, rel=1e-6)
    assert step.names == ["a/summary", "a/spatial", "b/spatial", "loss", "grad_norm"]  # b has no summary
    # paired by the side of the pixels (2): only b trains there; a's losses are still reported
    paired = DistillStep(model, make_optimizer(model, lr=0.1, weight_decay=0.0), teachers, loss=loss, grad_clip=1.0,
                         device=torch.device("cpu"), pairing={2: ["b"], 4: ["a", "b"]})
    losses, total = paired._losses(torch.zeros(1, 3, 2, 2), targets)
    assert [v.item() for v in losses] == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(0.5 * 0.25 * b_spatial, rel=1e-6)


def test_phis_needs_the_statistics_of_every_teacher():
    teachers = [TeacherMeta("a", None, 2, (1, 1), (), {"spatial": {"mean": np.zeros(2), "cov": np.eye(2)}}),
                TeacherMeta("b", None, 2, (1, 1), (), {})]
    model = _Fixed({})
    with pytest.raises(TrainingError, match=r"^--loss phis needs the normalisation statistics of teacher 'b', written "
                                            r"when the store's build completes$"):
        DistillStep(model, make_optimizer(model, lr=0.1, weight_decay=0.0), teachers, loss=LossConfig(kind="phis"),
                    grad_clip=1.0, device=torch.device("cpu"))


class _Scaled(torch.nn.Module):
    """A one-parameter 'student': teacher a's spatial map (B, 1, 1, 2) is p * m * (1, -1), m the mean of
    each normalised image; DDP's `no_sync` is recorded at each forward."""
    mean, std = (0.5,) * 3, (0.5,) * 3  # pixels 0 -> -1, 255 -> 1

    def __init__(self):
        super().__init__()
        self.p, self.in_no_sync, self.forwards = torch.nn.Parameter(torch.tensor(1.0)), False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.in_no_sync = True
        yield
        self.in_no_sync = False

    def forward(self, x):
        from types import SimpleNamespace
        self.forwards.append((len(x), self.in_no_sync))
        m = x.mean(dim=(1, 2, 3))
        spatial = self.p * m[:, None, None, None] * torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
        return SimpleNamespace(teachers={"a": SimpleNamespace(summary=None, spatial=spatial)})


def test_the_update_of_a_step_by_hand():
    """Two parts, of 1 and 3 samples, train and report as one batch of 4. Teacher a: spatial only, grid 1 x 2,
    PHI-S scale 4, teacher weight 2 x spatial weight 1.5 = 3. With p = 1, the squared token errors are
    part 1: m = 1, pred (1, -1) vs target (1, -3): 0, 4; part 2: m = -1, 1, -1: only (1, -1) vs (3, -1): 4, 0.
    Losses: part 1 (0 + 4) / 2 / 4 = 1/2, part 2 4 / 6 / 4 = 1/6; reported 1/4 x 1/2 + 3/4 x 1/6 = 1/4, total 3/4.
    dL/dp = 3 / (4 x 2 x 4) x sum 2 (pred - target) (m x sign) = 3/32 x (2 x 2 x -1 + 2 x -2 x 1) = -3/4:
    grad_norm 3/4, clipped to 1/2, SGD lr 0.1: p = 1 + 0.05."""
    teachers = [TeacherMeta("a", None, 1, (1, 2), (), {"spatial": {"mean": np.zeros(1), "cov": np.array([[4.0]])}})]
    loss = LossConfig(kind="phis", spatial_weight=1.5, teacher_weights={"a": 2.0})
    key = L.target_array("a", "spatial")

    def batch(pixels: list[int], targets: list[list[float]]) -> dict:
        return {"pixels": torch.tensor(pixels, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4),
                "index": torch.arange(len(pixels)),
                key: torch.tensor(targets, dtype=torch.float16).view(-1, 1, 2, 1)}

    part1, part2 = batch([255], [[1, -3]]), batch([0, 255, 0], [[-1, 1], [3, -1], [-1, 1]])
    model = _Scaled()
    step = DistillStep(model, torch.optim.SGD(model.parameters(), lr=0.1), teachers, loss=loss, grad_clip=0.5,
                       device=torch.device("cpu"))
    model.p.grad = torch.tensor(100.0)  # a stale gradient is dropped
    metrics = step(part1, part2)
    assert step.names == ["a/spatial", "loss", "grad_norm"]
    assert metrics.tolist() == pytest.approx([0.25, 0.75, 0.75], rel=1e-6)
    assert model.p.item() == pytest.approx(1.05, rel=1e-6)
    assert model.forwards == [(1, True), (3, False)]  # DDP: gradients are synchronised once, after the last part

    model = _Scaled()  # one part: `update` on decoded targets, no share, no no_sync
    step = DistillStep(model, torch.optim.SGD(model.parameters(), lr=0.1), teachers, loss=loss, grad_clip=10.0,
                       device=torch.device("cpu"))
    metrics = step.update(part2["pixels"], {"a": {"summary": None, "spatial": part2[key].float()}})
    # 1/6, 3 x 1/6 = 1/2; dL/dp = 3 / (3 x 2 x 4) x 2 x -2 x 1 = -1/2, under the clip: p = 1 + 0.05
    assert metrics.tolist() == pytest.approx([1 / 6, 0.5, 0.5], rel=1e-6)
    assert model.p.item() == pytest.approx(1.05, rel=1e-6) and model.forwards == [(3, False)]


def test_no_weight_decay_on_norms_biases_tokens_and_position_embeddings():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(4, 3)  # weight (3, 4) decays, bias does not
    model.norm = torch.nn.LayerNorm(3)  # 1-D: no decay
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 3))
    model.register_tokens = torch.nn.Parameter(torch.zeros(1, 4, 3))
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 16, 3))
    model.head = torch.nn.Parameter(torch.zeros(2, 3, 3))  # 3-D, not a token: decays
    optimizer = make_optimizer(model, lr=0.25, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]
    assert groups == [(0.05, ["head", "proj.weight"]),
                      (0.0, ["cls_token", "norm.bias", "norm.weight", "pos_embed", "proj.bias", "register_tokens"])]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["lr"] == 0.25 and g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
