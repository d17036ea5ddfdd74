"""Ray's GPU placement with fake GPUs: a Ray of its own (in a subprocess, beside the session's) that lists 2 GPUs
this machine does not have, so every branch that asks Ray for GPUs runs, on CPUs (CUDA is never opened)."""

import json
import os
import subprocess
import sys

import pytest
import torch

# beside real GPUs, Ray would hand an actor a real one: the device checks (BENCHMARKS.md, "GPU paths") run that
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="fake GPUs are for machines without CUDA")

SCRIPT = r"""
import json, sys
from pathlib import Path

import ray
from typer.testing import CliRunner

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.cli import train_app

ray.init(address="local", num_gpus=2, num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
root = Path(sys.argv[1])
data = make_sample_dataset(root / "data", images=4, size=64)
dinov2 = tuple(t for t in tiny_teachers() if t.name == "dinov2")  # one teacher: the actors start sooner
report = build_cache(CacheConfig(data=data, out=root / "cache.zarr", teachers=dinov2, views=1, shard_size=2, workers=2),
                     progress=False)
print(json.dumps({"complete": report["complete"], "shards_run": report["shards_run"], "workers": report["workers"]}))
train = CliRunner().invoke(train_app, [str(root / "cache.zarr"), "--student", "test_vit", "--out", str(root / "run"),
                                       "--steps", "1", "--batch-size", "2", "--resolution", "32", "--holdout", "0",
                                       "--ray-workers", "2", "--device", "cuda"])
print(json.dumps({"exit_code": train.exit_code, "output": train.output, "run": (root / "run").exists()}))
"""


@pytest.fixture(scope="module")
def fake_gpu_ray(tmp_path_factory) -> tuple[dict, dict]:
    """(build report, radio-train result) from a Ray started with num_gpus=2 on this GPU-less machine."""
    root = tmp_path_factory.mktemp("fake_gpus")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build, train = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    return build, train


@pytest.mark.slow
def test_a_build_on_2_gpus_starts_one_teacher_actor_per_gpu(fake_gpu_ray):
    build, _ = fake_gpu_ray
    assert build["complete"] and build["shards_run"] == 2
    workers = build["workers"]
    assert len(workers) == 2  # one per GPU (--workers is for CPU-only clusters)
    assert sorted(w["gpu_ids"] for w in workers) == [["0"], ["1"]]
    assert sorted(w["cuda_visible_devices"] for w in workers) == ["0", "1"]  # each actor sees its own GPU only
    assert {w["threads"] for w in workers} == {1}  # the node's 2 CPUs shared between its 2 GPUs
    assert {w["device"] for w in workers} == {"cpu"}  # CUDA cannot open a fake GPU: the teachers ran on the CPU


def test_ray_workers_device_cuda_is_checked_on_a_gpu_of_the_cluster_not_on_the_driver(fake_gpu_ray):
    """The driver has no GPU and says nothing of it; the check runs where Ray places a worker's GPU, and names it."""
    _, train = fake_gpu_ray
    assert train["exit_code"] == 2 and not train["run"], train
    line = train["output"].strip()
    assert line.startswith("error: --device cuda: no CUDA GPU is visible on Ray node ") and "\n" not in line, line
    assert "to a task Ray gave GPU 0 (CUDA_VISIBLE_DEVICES='0')" in line or \
        "to a task Ray gave GPU 1 (CUDA_VISIBLE_DEVICES='1')" in line, line
    assert line.endswith("check the node's driver and torch build, or train with --device cpu"), line
