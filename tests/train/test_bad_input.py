"""Training refuses bad input with one clear line, and never trains on data it should not."""

import json
import shutil
import time

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_distill.store import layout as L
from radio_distill.cli import train_app
from radio_distill.errors import CacheLayoutError, DatasetError, TrainingError, UnknownStudentError
from radio_distill.student import load_student
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader

from .conftest import config


@pytest.mark.slow
def test_incomplete_store_needs_allow_partial(store_copy, tmp_path):
    zarr.open_group(store_copy, mode="r+")[L.done_array("sam")][1] = 0
    with pytest.raises(CacheLayoutError, match="incomplete: 6 of 7 shards done.*--allow-partial"):
        train(config(store_copy, tmp_path / "run"), progress=False)
    reader = CacheReader(store_copy, allow_partial=True)
    used = np.asarray(reader.indices(holdout=0.0))
    assert used.size and not np.any((used >= 8) & (used < 16)), "samples of the unfinished shard were used"
    train(config(store_copy, tmp_path / "run", allow_partial=True, steps=2), progress=False)


def test_missing_images_root_and_missing_file_are_named(store_copy, tmp_path):
    reader = CacheReader(store_copy)
    first = reader.root_dir / reader.ids[reader.indices(holdout=0.1)[3]]
    moved = reader.root_dir.with_name("moved")
    first_backup = tmp_path / "first.jpg"
    shutil.copy(first, first_backup)
    first.unlink()
    try:
        with pytest.raises(DatasetError, match=f"image '{first}'.*is missing"):
            train(config(store_copy, tmp_path / "a"), progress=False)
        reader.root_dir.rename(moved)
        try:
            with pytest.raises(DatasetError, match="images root .* is missing"):
                train(config(store_copy, tmp_path / "b"), progress=False)
        finally:
            moved.rename(reader.root_dir)
    finally:
        shutil.copy(first_backup, first)


def test_unknown_student_names_where_to_look(train_store, tmp_path):
    with pytest.raises(UnknownStudentError, match="list_students.*timm.list_models"):
        train(config(train_store, tmp_path / "run", student="vit_nonexistent_patch16"), progress=False)
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "nope_net", "--out", str(tmp_path / "r"),
                                            "--steps", "1", "--batch-size", "8"])
    assert result.exit_code == 2
    assert "unknown student 'nope_net'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # the student is built before the run folder


@pytest.mark.slow
def test_a_ray_train_workers_error_is_its_one_line(train_store, tmp_path, ray_session):
    """The images' folder is looked for by the workers, not the driver: its error comes back as one line."""
    gone = tmp_path / "gone"
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(tmp_path / "r"),
                                            "--steps", "1", "--batch-size", "8", "--images", str(gone),
                                            "--ray-workers", "1", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (f"error: Ray Train worker 0 failed: images root '{gone}' of store "
                                                      f"'{train_store}' is missing; move the images back, or give "
                                                      "their new place with --images"), result.output


@pytest.mark.parametrize("args, line", [
    (["--ray-workers", "4"], "error: --ray-workers 4 needs 4 CPU in the Ray cluster, which has 2; ask for fewer, or "
                             "add nodes"),  # Ray Train waited for them forever
    (["--ray-workers", "0"], "error: --ray-workers 0: must be a whole number >= 1"),  # trained here, without Ray
    (["--ray-workers", "1", "--address", "garbage"],
     "error: --address 'garbage': expected HOST:PORT of a Ray cluster's head, e.g. 10.0.0.1:6379 as `ray start "
     "--head` prints it, or auto"),
])
def test_ray_workers_that_cannot_run_are_one_line_within_seconds(train_store, tmp_path, ray_session, args, line):
    start = time.monotonic()
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(tmp_path / "r"),
                                            "--steps", "1", "--device", "cpu", *args])
    assert result.exit_code == 2 and result.output.strip() == line, result.output
    assert time.monotonic() - start < 10 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, line", [
    (["--resolution", "40"], "error: --resolution 40 is not a multiple of 16, the input stride of 'test_vit'"),
    (["--batch-size", "48"], "error: --batch-size 48 takes 48 samples a step, more than the 42 of the training split "
                             "(--holdout 0.1 of 46 usable): every batch would repeat samples; lower --batch-size"),
])
def test_a_bad_resolution_or_a_batch_larger_than_the_split_creates_nothing(train_store, tmp_path, args, line):
    out = tmp_path / "r"
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(out), "--steps", "1",
                                            "--holdout", "0.1", "--workers", "0", "--batch-size", "8", *args])
    # one line, after the store's warning line
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == line, result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_nan_loss_stops_naming_step_and_teacher_and_keeps_checkpoint(store_copy, tmp_path, record_again):
    run = tmp_path / "run"
    train(config(store_copy, run, steps=6, stop_at=2, checkpoint_every=1), progress=False)
    before = load_student(run / "checkpoint/student").state_dict()
    summary = zarr.open_group(store_copy, mode="r+")[L.target_array("dinov2", "summary")]
    summary[...] = np.full(summary.shape, np.nan, dtype=np.float16)
    record_again(store_copy, L.target_array("dinov2", "summary"))  # as a teacher that output NaN would have
    with pytest.raises(TrainingError, match=r"teacher 'dinov2' \(dinov2/summary\) is not finite at step 2.*kept"):
        train(config(store_copy, run, steps=6, resume=True, checkpoint_every=1), progress=False)
    assert json.loads((run / "checkpoint/state.json").read_text())["step"] == 2
    after = load_student(run / "checkpoint/student").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_from_a_store_with_other_settings_is_refused(train_store, store_copy, tmp_path):
    run = tmp_path / "run"
    train(config(train_store, run, steps=4, stop_at=2), progress=False)
    root = zarr.open_group(store_copy, mode="r+")
    settings = dict(root.attrs["settings"])
    settings["views"] = 3
    root.attrs["settings"] = settings
    with pytest.raises(TrainingError, match="other teachers or settings"):
        train(config(store_copy, run, steps=4, resume=True), progress=False)
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(config(train_store, run, steps=4), progress=False)
    with pytest.raises(TrainingError, match="started with batch_size=8, lr=0.002; an exact resume needs"):
        train(config(train_store, run, steps=4, resume=True, batch_size=4, lr=1e-3), progress=False)
    with pytest.raises(TrainingError, match="trains 'test_vit', not 'test_resnet'"):
        train(config(train_store, run, steps=4, resume=True, student="test_resnet"), progress=False)
    with pytest.raises(TrainingError, match=r"started with upsample=\{\}; an exact resume needs"):  # other heads
        train(config(train_store, run, steps=4, resume=True, upsample={"sam": 2}), progress=False)


def test_resolution_must_fit_the_student_stride(train_store, tmp_path):
    with pytest.raises(TrainingError, match="--resolution 40 is not a multiple of 16"):
        train(config(train_store, tmp_path / "run", resolution=40), progress=False)


def test_an_upsampled_head_finer_than_its_teacher_is_refused(train_store, tmp_path):
    """The tiny SAM's grid is 8 x 8; a student of stride 16 at 32 and 64 px has 2 x 2 and 4 x 4 tokens."""
    with pytest.raises(TrainingError, match=r"^--upsample sam=8: the student's map would be finer than the 8 x 8 grid of "
                                            r"teacher 'sam' at every --resolution; at most 4 here$"):
        train(config(train_store, tmp_path / "run", resolution=(32, 64), upsample={"sam": 8}), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, option", [
    (["--resolution", "0"], "--resolution 0"), (["--resolution", "-32"], "--resolution -32"),
    (["--steps", "0"], "--steps 0"), (["--epochs", "0"], "--epochs 0"), (["--batch-size", "0"], "--batch-size 0"),
    (["--holdout", "-0.1"], "--holdout -0.1"), (["--holdout", "1"], "--holdout 1"), (["--lr", "0"], "--lr 0"),
    (["--lr", "nan"], "--lr nan"), (["--log-every", "0"], "--log-every 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every 0"), (["--workers", "-1"], "--workers -1"),
    (["--stop-at", "0"], "--stop-at 0"), (["--seed", "-1"], "--seed -1"),
    (["--teacher-weight", "sam=-1"], "--teacher-weight sam=-1"), (["--teacher-weight", "sam=nan"], "--teacher-weight sam=nan"),
    ([f"--teacher-weight={t}=0" for t in ("clip", "dinov2", "sam")], "--teacher-weight gives every teacher of the store"),
    (["--upsample", "sam=0"], "--upsample sam=0: must be a whole number >= 1"),
    (["--upsample", "sam=2.5"], "--upsample 'sam=2.5': expected NAME=K, a whole number"),
    (["--upsample", "sm=2"], "--upsample sm=2: no teacher 'sm' in the store; it has ['clip', 'dinov2', 'sam']"),
    (["--upsample", "sam=9"], "--upsample sam=9: above the side of the 8 x 8 grid of teacher 'sam'"),
    (["--epochs", "1"], "--steps 2 and --epochs 1.0: give one of them, not both"),
    (["--device", "tpu"], "--device 'tpu'"), (["--device", "cuda"], "--device cuda"), (["--device", "cuda:7"], "--device cuda:7"),
    (["--resolution", "32,abc"], "--resolution '32,abc': expected whole numbers"), (["--resolution", "32,0"], "--resolution 0"),
    (["--resolution", "32,48,32"], "--resolution 32,48,32: give one side or several different ones"),
    (["--resolution-policy", "mixed"], "--resolution-policy 'mixed': choose from random, partition"),
    (["--batch-size", "4,4"], "--batch-size 4,4 with --resolution 32: several batch sizes need --resolution-policy partition"),
    (["--resolution", "32,48", "--resolution-policy", "partition"], "--batch-size 4 with --resolution 32,48: "),
])
def test_silly_option_values_give_one_line_and_create_nothing(train_store, tmp_path, monkeypatch, args, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    out = tmp_path / "run"
    result = CliRunner().invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(out), "--steps", "2",
                                            "--resolution", "32", "--batch-size", "4", "--workers", "0", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {option}") and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
