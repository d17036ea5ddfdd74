"""The trainer's GPU code paths, run on the CPU: the step and the loop under bf16 autocast (the precision
`radio-train` runs in on a GPU), compared with fp32; the device of --ray-workers checked where the workers run.

On a machine with CUDA the same tests also run on `cuda` (pinned batches, non-blocking copies, bf16 autocast
against RADIO_DISTILL_AUTOCAST=fp32 on the same GPU): the device check of BENCHMARKS.md, "GPU paths"."""

import copy
import csv
from dataclasses import replace

import pytest
import torch

from radio_distill.ops import AUTOCAST_ENV
from radio_distill.store.reader import CacheReader
from radio_distill.student import TeacherDims, create_student
from radio_distill.train.loop import train
from radio_distill.train.step import DistillStep, make_optimizer

from .conftest import config

# bf16 rounds each value to 2^-9 (~0.2%). From the same weights and batch, a step's losses were within 0.2% of
# fp32 (measured: vit 0.06%, resnet 0.20%, eradio 0.20%) and its gradients at cos 0.997 (resnet) to 1.0000 (vit);
# over the loop's first 3 steps (the weights drift apart) the losses stayed within 0.11%. Bounds: 5-10x that
# grad_norm sums every gradient's bf16 rounding: 1.3% off on one batch of E-RADIO (its direction: the cosine)
STEP_LOSS_REL, STEP_NORM_REL, STEP_GRAD_COS, LOOP_LOSS_REL = 0.01, 0.03, 0.99, 0.01


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (a device check, BENCHMARKS.md)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _rows(run) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student", ["test_vit", "test_resnet", "test_eradio"])
def test_a_step_under_bf16_autocast_gives_the_fp32_losses_and_gradients(train_store, monkeypatch, student, device):
    reader = CacheReader(train_store)
    batch = next(iter(reader.loader(reader.indices(holdout=0.1), resolution=32, batch_size=8, seed=0, start_step=0,
                                    steps=1, workers=0)))
    torch.manual_seed(0)
    dims = {t.name: TeacherDims(t.summary_dim, t.spatial_dim) for t in reader.teachers}
    first = create_student(student, teachers=dims)
    out = {}
    for mode in ("fp32", "bf16"):
        monkeypatch.setenv(AUTOCAST_ENV, mode)
        model = copy.deepcopy(first).to(device)
        step = DistillStep(model, make_optimizer(model, lr=1e-3, weight_decay=0.05), reader.teachers,
                           loss=config(train_store, None).loss, grad_clip=1e9, device=torch.device(device))
        metrics = step(batch)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).cpu()
        out[mode] = dict(zip(step.names, metrics.tolist())), grads
    (ref, g32), (got, g16) = out["fp32"], out["bf16"]
    assert g16.dtype == torch.float32 and not torch.equal(g32, g16)  # bf16 ran, the master weights stay fp32
    for name in ref:
        assert got[name] == pytest.approx(ref[name], rel=STEP_NORM_REL if name == "grad_norm" else STEP_LOSS_REL), name
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) >= STEP_GRAD_COS


@pytest.mark.parametrize("device", DEVICES)
def test_the_loop_under_bf16_autocast_follows_fp32(train_store, tmp_path, monkeypatch, device):
    monkeypatch.setenv(AUTOCAST_ENV, "fp32")
    fp32 = config(train_store, tmp_path / "fp32", steps=3, device=device)
    train(fp32, progress=False)
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    train(replace(fp32, out=tmp_path / "bf16"), progress=False)
    a, b = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert len(a) == len(b) == 3 and a != b
    for ra, rb in zip(a, b):
        for key in [k for k in ra if "/" in k] + ["loss"]:
            assert rb[key] == pytest.approx(ra[key], rel=LOOP_LOSS_REL), (ra["step"], key)


def test_ray_workers_take_a_gpu_as_the_device_asks():
    from radio_distill.train.on_ray import wants_gpu

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [wants_gpu(None, 2), wants_gpu(None, 0), wants_gpu(cuda, 2), wants_gpu(cuda, 0)] == [True, False, True, True]
    assert not wants_gpu(cpu, 8)  # was: a GPU each, and an NCCL group for the CPU tensors of a CPU run


@pytest.mark.parametrize("args, line", [
    # the driver has no GPU: --device cuda is not refused for that, but the cluster has none either
    pytest.param(["--ray-workers", "1", "--device", "cuda"], "error: --ray-workers 1 --device cuda needs 1 GPU in the Ray "
                 "cluster, which has 0; ask for fewer, or add nodes", marks=pytest.mark.skipif(
                     torch.cuda.is_available(), reason="the session's Ray has this machine's GPUs")),
    (["--ray-workers", "1", "--device", "cuda:1"], "error: --device cuda:1 with --ray-workers: each worker trains on the "
                                                   "GPU Ray gives it; give --device cuda"),
])
def test_ray_workers_device_is_not_checked_against_the_drivers_gpus(train_store, tmp_path, ray_session, monkeypatch,
                                                                     args, line):
    from typer.testing import CliRunner

    from radio_distill.cli import train_app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(tmp_path / "r"),
                                            "--steps", "1", "--batch-size", "8", *args])
    assert result.exit_code == 2 and result.output.strip() == line, result.output
    assert not (tmp_path / "r").exists()


def test_ray_train_workers_that_cannot_start_are_one_line(train_store, tmp_path, ray_session, monkeypatch):
    """Ray Train raises a ControllerError carrying the workers' traceback when their process group cannot start
    (as NCCL's on a node whose GPUs CUDA cannot open, `tests/test_fake_gpus.py`): one line, its last."""
    from ray.train import ControllerError
    from ray.train.torch import TorchTrainer

    from radio_distill.errors import RadioDistillError
    from radio_distill.train.on_ray import train_on_ray

    failure = RuntimeError("ray::execute._setup_torch_process_group() (pid=1, ip=10.0.0.2)\n  File \"config.py\", line 147,"
                           " in _setup_torch_process_group\n    dist.init_process_group(\nValueError: ProcessGroupNCCL is "
                           "only supported with GPUs, no GPUs found!")
    def fit(self):
        raise ControllerError(failure)

    monkeypatch.setattr(TorchTrainer, "fit", fit)
    with pytest.raises(RadioDistillError) as e:
        train_on_ray(config(train_store, tmp_path / "r"), workers=1)
    assert str(e.value) == ("Ray Train workers could not start: ValueError: ProcessGroupNCCL is only supported with "
                            "GPUs, no GPUs found!")
