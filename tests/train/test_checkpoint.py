"""Checkpoints: a crash anywhere in the swap resumes from a complete checkpoint, and the next save cleans up;
a full disk at a checkpoint or at the export is one line and keeps the last checkpoint."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from radio_distill.errors import TrainingError
from radio_distill.student import TeacherDims, create_student, load_student
from radio_distill.train.checkpoint import latest, load_checkpoint, save_checkpoint
from radio_distill.train.loop import train

from .conftest import config


def _trained(steps: int = 1):
    """A tiny student and its AdamW after `steps` steps (so the optimizer has state to save)."""
    torch.manual_seed(0)
    model = create_student("test_vit", teachers={"clip": TeacherDims(8, 8)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    return model, optimizer


def _step(directory) -> int:
    return json.loads((directory / "state.json").read_text())["step"]


@pytest.mark.parametrize("crash, resumes_at", [
    ("between the renames", 1),  # checkpoint -> checkpoint.old done, checkpoint.tmp not yet renamed
    ("after the renames", 2),  # both there: 'Directory not empty' at every later save
    ("while deleting .old", 2),  # both there, .old half deleted (state.json left)
    ("a newer incomplete checkpoint", 1),  # both there, the newer one missing a file
])
def test_a_crash_in_the_swap_resumes_from_the_complete_checkpoint_and_the_next_save_cleans_up(tmp_path, crash,
                                                                                              resumes_at):
    model, optimizer = _trained()
    ckpt, old, tmp = (tmp_path / "run" / name for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp"))
    for step in (1, 2):
        save_checkpoint(tmp_path / str(step) / "checkpoint", model=model, optimizer=optimizer, step=step, run={})
    shutil.move(tmp_path / "1" / "checkpoint", old)
    shutil.move(tmp_path / "2" / "checkpoint", tmp if crash == "between the renames" else ckpt)
    if crash == "while deleting .old":
        shutil.rmtree(old / "student")
    if crash == "a newer incomplete checkpoint":
        (ckpt / "optimizer.safetensors").unlink()
    found = latest(ckpt)
    assert _step(found) == resumes_at
    assert load_checkpoint(found, model=model, optimizer=optimizer) == resumes_at
    save_checkpoint(ckpt, model=model, optimizer=optimizer, step=3, run={})
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint"] and _step(latest(ckpt)) == 3


def test_a_fresh_run_never_deletes_the_checkpoint_a_crash_left_as_old(train_store, tmp_path):
    """A crash between the renames leaves only checkpoint.old: without --resume it is refused, not overwritten."""
    model, optimizer = _trained()
    save_checkpoint(tmp_path / "run" / "x", model=model, optimizer=optimizer, step=4, run={})
    (tmp_path / "run" / "x").rename(tmp_path / "run" / "checkpoint.old")
    with pytest.raises(TrainingError, match="already holds a checkpoint; pass --resume"):
        train(config(train_store, tmp_path / "run"), progress=False)
    assert _step(tmp_path / "run" / "checkpoint.old") == 4


def _full_disk(tensors, path, **kw):
    """safetensors' `save_file` on a disk that fills up halfway through the file."""
    Path(path).write_bytes(bytes(100))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("writer", ["radio_distill.student.export.save_file",  # the student's weights
                                    "radio_distill.train.checkpoint.save_file"])  # the optimizer's
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, writer):
    """It was an OSError traceback, leaving checkpoint.tmp/ (half a checkpoint) on the full disk."""
    model, optimizer = _trained()
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, model=model, optimizer=optimizer, step=1, run={})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    later, later_optimizer = _trained(steps=2)
    monkeypatch.setattr(writer, _full_disk)
    with pytest.raises(TrainingError) as e:
        save_checkpoint(ckpt, model=later, optimizer=later_optimizer, step=2, run={})
    assert str(e.value) == (f"cannot write the checkpoint of step 2 to '{ckpt}': No space left on device; the "
                            f"checkpoint in '{ckpt}' (step 1) is kept; free space and continue with --resume")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    assert load_checkpoint(latest(ckpt), model=later, optimizer=later_optimizer) == 1
    assert all(torch.equal(later.state_dict()[k], v) for k, v in saved.items())


def test_a_full_disk_at_the_export_is_one_line_and_resume_exports(train_store, tmp_path, monkeypatch):
    from radio_distill.student import export

    run, write = tmp_path / "run", export.save_file
    monkeypatch.setattr(export, "save_file", lambda tensors, path, **kw: _full_disk(tensors, path) if
                        Path(path).parent == run / "student" else write(tensors, path, **kw))
    with pytest.raises(TrainingError) as e:
        train(config(train_store, run, steps=2), progress=False)
    assert str(e.value) == (f"cannot write the student to '{run / 'student'}': No space left on device; the checkpoint "
                            f"in '{run / 'checkpoint'}' holds step 2: free space and export it with --resume")
    assert list((run / "student").iterdir()) == []  # no half file
    monkeypatch.undo()
    assert train(config(train_store, run, steps=2, resume=True), progress=False)["step"] == 2
    exported, kept = load_student(run / "student"), load_student(run / "checkpoint" / "student")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in kept.state_dict().items())
