"""`radio-train --denoise mean`: checked like every option, refused in one line without a pattern, and recorded
in run.json so that `--resume` continues with the same patterns and `radio-eval` measures against them. (That
the targets are the decoded ones less the pattern, exactly: tests/cache/test_pattern.py.)"""

import json
from dataclasses import replace

import pytest
import zarr
from typer.testing import CliRunner

from radio_distill.cache.pattern import estimate_patterns
from radio_distill.cli import train_app
from radio_distill.errors import RadioDistillError, TrainingError
from radio_distill.evaluate.features import load_run, open_reader
from radio_distill.store import layout as L
from radio_distill.store.provenance import WHOLE
from radio_distill.train.config import load_train_config
from radio_distill.train.loop import check_resume, train

from .conftest import config

runner = CliRunner()


def test_denoise_is_checked_and_documented(train_store, tmp_path):
    with pytest.raises(RadioDistillError, match=r"^--denoise 'median': choose from none, mean, shift$"):
        config(train_store, tmp_path / "r", denoise="median")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('denoise = "mean"\n')
    assert load_train_config(recipe, store=train_store, out=tmp_path / "r", steps=1, device="cpu").denoise == "mean"
    assert config(train_store, tmp_path / "r").denoise == "none"
    help_text = " ".join(w for w in runner.invoke(train_app, ["--help"], env={"COLUMNS": "200"}).stdout.split()
                         if w != "│")  # the help panel's borders
    assert "--denoise" in help_text and "none (targets as stored), mean (" in help_text and "or shift (" in help_text


def test_without_a_pattern_it_is_one_line_before_anything_is_created(train_store, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(train_app, [str(train_store), "--student", "test_vit", "--out", str(out), "--steps", "1",
                                       "--resolution", "32", "--device", "cpu", "--denoise", "mean"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: store '{train_store}' holds no fixed-pattern estimate of teacher "
                                          f"'clip'; run `radio-cache pattern {train_store}` first"]
    assert not out.exists()


def test_the_run_records_it_and_resumes_only_with_the_same_patterns(store_copy, tmp_path):
    estimate_patterns(store_copy)
    root = zarr.open_group(store_copy, mode="r")
    digests = {t: root[L.pattern_array(t, "offset")].attrs[WHOLE] for t in ("clip", "dinov2", "sam")}
    run = config(store_copy, tmp_path / "run", steps=4, stop_at=2, denoise="mean")
    train(run, progress=False)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["denoise"] == "mean" and saved["patterns"] == digests
    with pytest.raises(TrainingError, match=r"was started with denoise=mean; an exact resume needs the same"):
        train(replace(run, stop_at=None, resume=True, denoise="none"), progress=False)
    estimate_patterns(store_copy, samples=5)  # other patterns than the run subtracted
    with pytest.raises(TrainingError, match=r"the fixed patterns in .* changed since run .* started"):
        train(replace(run, stop_at=None, resume=True), progress=False)
    estimate_patterns(store_copy)  # the same samples: the same patterns again
    assert train(replace(run, stop_at=None, resume=True), progress=False)["step"] == 4
    info = load_run(tmp_path / "run")
    assert info.denoise == "mean"
    assert all(t.pattern for t in open_reader(store_copy, info).teachers)


def test_a_run_saved_before_denoise_existed_resumes_as_none():
    run = {"store_settings": {}, "student": "s", "store": "x", "patterns": None,
           "config": {"student_overrides": {}, "steps": 4, "denoise": "none"}}
    old = {**run, "config": {"student_overrides": {}, "steps": 4}}
    del old["patterns"]
    check_resume(old, run, "r")  # no error
    with pytest.raises(TrainingError, match="was started with denoise=none"):
        check_resume(old, {**run, "config": {**run["config"], "denoise": "mean"}}, "r")
