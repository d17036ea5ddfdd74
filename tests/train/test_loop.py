"""The training loop on a tiny store: losses fall, resume is exact, DDP matches one process."""

import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from radio_distill.errors import DatasetError
from radio_distill.student import load_student
from radio_distill.train.loop import default_warmup, get_lr, holdout_note, train

from .conftest import config


def read_metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


TEACHER_LOSSES = ["clip/summary", "clip/spatial", "dinov2/summary", "dinov2/spatial", "sam/spatial"]


@pytest.mark.parametrize("student", ["test_vit", "test_resnet", "test_eradio"])
def test_losses_fall_for_vit_cnn_and_eradio_students_from_one_store(train_store, tmp_path, student):
    cfg = config(train_store, tmp_path / student, student=student, steps=30, resolution=64, lr=3e-3)
    result = train(cfg, progress=False)
    rows = read_metrics(tmp_path / student)
    assert len(rows) == 30 and set(TEACHER_LOSSES) <= set(rows[0])
    for key in TEACHER_LOSSES:
        first = np.mean([r[key] for r in rows[:3]])
        last = np.mean([r[key] for r in rows[-3:]])
        assert last < first, f"{student}: {key} did not fall ({first:.4f} -> {last:.4f})"
    assert result["step"] == 30
    model = load_student(tmp_path / student / "student")
    out = model(torch.randn(2, 3, 64, 64))
    assert out.teachers["sam"].summary is None and out.teachers["clip"].summary.shape == (2, 32)


def test_resume_continues_exactly(train_store, tmp_path):
    full = config(train_store, tmp_path / "full", steps=8, checkpoint_every=4)
    train(full, progress=False)
    part = config(train_store, tmp_path / "part", steps=8, checkpoint_every=4, stop_at=4)
    train(part, progress=False)
    assert json.loads((tmp_path / "part/checkpoint/state.json").read_text())["step"] == 4
    train(replace(part, stop_at=None, resume=True), progress=False)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in TEACHER_LOSSES + ["lr"]:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)
    wa = load_student(tmp_path / "full/student").state_dict()
    wb = load_student(tmp_path / "part/student").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(train_store, tmp_path):
    one = config(train_store, tmp_path / "one", steps=3)
    train(one, progress=False)
    script = shutil.which("radio-train") or str(Path(sys.executable).parent / "radio-train")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
           str(train_store), "--student", "test_vit", "--out", str(tmp_path / "two"), "--steps", "3",
           "--batch-size", "8", "--resolution", "32", "--lr", "2e-3", "--workers", "0", "--log-every", "1",
           "--device", "cpu", "--holdout", "0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in TEACHER_LOSSES:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    wa = load_student(tmp_path / "one/student").state_dict()
    wb = load_student(tmp_path / "two/student").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


@pytest.mark.slow
def test_phis_loss_and_spawned_loader_workers(train_store, tmp_path):
    cfg = config(train_store, tmp_path / "phis", steps=12, workers=2, loss=replace(config(train_store, tmp_path).loss,
                                                                                       kind="phis"))
    train(cfg, progress=False)
    rows = read_metrics(tmp_path / "phis")
    assert len(rows) == 12
    assert rows[-1]["dinov2/spatial"] < rows[0]["dinov2/spatial"]
    assert (tmp_path / "phis/tensorboard").is_dir() and any((tmp_path / "phis/tensorboard").iterdir())


@pytest.mark.slow
def test_ray_train_two_workers_match_one_process(train_store, tmp_path, ray_session):
    from radio_distill.train.on_ray import train_on_ray

    one = config(train_store, tmp_path / "one", steps=3)
    train(one, progress=False)
    train_on_ray(replace(one, out=tmp_path / "ray"), workers=2)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ray")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in TEACHER_LOSSES:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    assert (tmp_path / "ray/student/model.safetensors").is_file()


@pytest.mark.slow
def test_stored_view_pixels_train_exactly_like_decoded_images(train_store, tmp_path, ray_session):
    """A store built with --pixels R gives the trainer the same pixels without the images."""
    import zarr

    from radio_distill.cache.build import build_cache
    from radio_distill.cache.config import CacheConfig
    from radio_distill.cache.teachers import tiny_teachers
    from radio_distill.store.group import open_store
    from radio_distill.store.reader import CacheReader

    src = open_store(train_store)
    images = Path(src.attrs["dataset"]["root"])
    with_pixels = tmp_path / "pixels.zarr"
    build_cache(CacheConfig(data=images, out=with_pixels, teachers=tuple(tiny_teachers()), views=2, shard_size=8,
                            workers=2, pixels=32), progress=False)
    from radio_distill.store.inspect import store_info, verify_store
    assert verify_store(with_pixels)["arrays"] == verify_store(train_store)["arrays"] + 1
    assert store_info(with_pixels)["pixels"] == 32 and store_info(train_store)["pixels"] is None
    reader = CacheReader(with_pixels)
    i = int(reader.indices(holdout=0.0)[5])
    stored = zarr.open_group(with_pixels)["samples/pixels"][i, 1]
    decoded = reader.dataset(resolution=64).crop(i, 1)  # another resolution decodes the image
    assert stored.shape == (32, 32, 3) and decoded.shape == (64, 64, 3)
    assert np.array_equal(stored, reader.dataset(resolution=32).crop(i, 1))
    # a smaller side is resized from the stored pixels: within a few grey levels of a decode at that side
    small = reader.dataset(resolution=32).__getitems__([(i, 1, 16)])[0]["pixels"].permute(1, 2, 0).numpy()
    decoded_small = reader.dataset(resolution=16).crop(i, 1)
    assert small.shape == (16, 16, 3) and 0 < np.abs(small.astype(int) - decoded_small).mean() < 4

    from_images = config(train_store, tmp_path / "images", steps=3)
    train(from_images, progress=False)
    moved = images.with_name("moved_away")
    images.rename(moved)  # the pixel store needs no images at the student resolution
    try:
        train(replace(from_images, store=with_pixels, out=tmp_path / "pixels"), progress=False)
        train(replace(from_images, store=with_pixels, out=tmp_path / "smaller", resolution=[16, 32], steps=2),
              progress=False)  # nor at smaller sides
        with pytest.raises(DatasetError, match="images root .* is missing"):  # a larger side decodes them
            train(replace(from_images, store=with_pixels, out=tmp_path / "larger", resolution=[32, 64]), progress=False)
    finally:
        moved.rename(images)
    a, b = read_metrics(tmp_path / "images"), read_metrics(tmp_path / "pixels")
    for ra, rb in zip(a, b):
        for key in TEACHER_LOSSES:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-7), (ra["step"], key)


def test_lr_schedule_warms_up_then_falls_by_cosine_to_min_lr():
    def lr(step):
        return get_lr(step, lr=1.0, min_lr=0.1, warmup=10, steps=110)

    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup, at lr on its last step
    assert [lr(s) for s in (10, 60, 110)] == pytest.approx([1.0, 0.55, 0.1])  # cosine: peak, half way, floor
    rates = [lr(s) for s in range(111)]
    assert all(a < b for a, b in zip(rates[:10], rates[1:10])) and all(a > b for a, b in zip(rates[10:], rates[11:]))
    assert [default_warmup(s) for s in (10, 1000, 20000)] == [1, 50, 1000]


def test_the_loop_logs_the_schedule(train_store, tmp_path):
    train(config(train_store, tmp_path / "run", steps=5, lr=1e-3, min_lr=1e-4, warmup_steps=2), progress=False)
    logged = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert logged == pytest.approx([get_lr(s, lr=1e-3, min_lr=1e-4, warmup=2, steps=5) for s in range(5)], rel=1e-6)
    assert logged[:3] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_a_held_out_split_too_small_to_measure_is_named():
    assert holdout_note(2, 40, 0.05) == ("warning: --holdout 0.05 holds out 2 of 40 usable samples, too few for "
                                         "radio-eval to measure the student on; pass --holdout 0.5 to hold out about 20")
    assert holdout_note(31, 1000, 0.03) == ("warning: --holdout 0.03 holds out 31 of 1000 usable samples, too few for "
                                            "radio-eval to measure the student on; pass --holdout 0.04 to hold out about 40")
    assert holdout_note(32, 1000, 0.03) is None and holdout_note(0, 0, 0.05) is None
