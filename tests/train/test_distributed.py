"""Several training processes (torchrun, gloo on the CPU: the code paths NCCL takes on GPUs): a loader that
fails on one rank ends every rank with its one line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from radio_distill.store.reader import CacheReader, StepSampler

# NCCL, one GPU a rank: a device check (scripts/device_check.py) on a machine with 2 GPUs
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))]
RUN = dict(batch_size=8, resolution=32, seed=0, holdout=0.1, steps=3)


def _drawn_by_rank_1_only(reader: CacheReader, *, step: int) -> int:
    """A sample rank 1 of 2 draws at `step` and no rank draws at another step of the run (nor rank 0 at it)."""
    indices = reader.indices(holdout=RUN["holdout"])
    drawn = {}
    for rank in (0, 1):
        sampler = StepSampler(indices, views=reader.views, resolution=RUN["resolution"], batch_size=RUN["batch_size"],
                              seed=RUN["seed"], start_step=0, steps=RUN["steps"], rank=rank, world=2)
        for s, part in enumerate(sampler):
            for i, _, _ in part:
                drawn.setdefault(i, set()).add((rank, s))
    return next(i for i, where in sorted(drawn.items()) if where == {(1, step)})


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_loader_failing_on_rank_1_ends_every_rank_with_its_line(train_store, tmp_path, device):
    """Rank 1 reads an image whose bytes changed (its size and mtime kept: the start-up check passes, the read
    does not); rank 0's data is fine. Both ranks end at that step with rank 1's line, after rank 0 checkpoints
    the step before. Before, rank 0 went on into the step's gradient all-reduce and died there with gloo's
    'Connection closed by peer' traceback once rank 1 had exited (NCCL would wait there until torchrun killed it)."""
    reader = CacheReader(train_store)
    images = shutil.copytree(reader.root_dir, tmp_path / "images")  # copy2: mtimes kept, as the store records them
    sample = _drawn_by_rank_1_only(reader, step=1)
    path = images / reader.ids[sample]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    script = shutil.which("radio-train") or str(Path(sys.executable).parent / "radio-train")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--tee", "3", script,
           str(train_store), "--images", str(images), "--student", "test_vit", "--out", str(out), "--steps", "3",
           "--batch-size", "8", "--resolution", "32", "--workers", "0", "--log-every", "1", "--device", device,
           "--holdout", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = (f"error: image '{path}' (sample {sample}) is not the image its targets were computed from (its bytes "
            "changed since the build); give the images the store was built from (--images), or rerun `radio-cache "
            f"build`; the checkpoint in '{out / 'checkpoint'}' holds step 1: continue with --resume once the store "
            "is repaired")
    said = proc.stdout + proc.stderr
    for rank in (0, 1):
        lines = [s.split(":", 1)[1] for s in said.splitlines() if s.startswith(f"[default{rank}]:")]
        assert lines and lines[-1] == line, (rank, said[-4000:])
    assert "Traceback (most recent call last)" not in "".join(s for s in said.splitlines() if s.startswith("[default"))
    assert (out / "checkpoint/state.json").is_file() and (out / "metrics.csv").read_text().count("\n") == 2  # step 1
