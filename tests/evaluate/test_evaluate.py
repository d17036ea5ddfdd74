"""`radio-eval` on a tiny store and run: every metric, the pictures, the split, isolation and the CLI."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from radio_distill.cli import eval_app
from radio_distill.errors import DatasetError, EvaluationError
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.evaluate.throughput import images_per_second
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train
from radio_distill.store.reader import CacheReader, is_held_out

from .conftest import FAST, HOLDOUT, evaluate_in_subprocess

TEACHERS = ["clip", "dinov2", "sam"]


def test_report_has_every_section_with_results(evaluated):
    r = evaluated.report
    for section in ("fidelity", "knn", "zero_shot", "dense", "sam", "throughput", "pictures", "split"):
        assert section in r and "skipped" not in r[section], section
    assert (evaluated.out / "report.md").read_text().count("## ") == 7


def test_fidelity_per_teacher_summary_and_spatial(evaluated):
    fid = evaluated.report["fidelity"]["teachers"]
    assert sorted(fid) == TEACHERS and fid["sam"]["summary"] is None
    for t in TEACHERS:
        assert -1 <= fid[t]["spatial"] <= 1 and fid[t]["grid"] == [8, 8]
    assert 0 < fid["clip"]["summary"] <= 1  # 10 steps already point the summaries the right way


def test_fidelity_at_several_resolutions(evaluated, eval_setup, tmp_path):
    """Main side 64 with a sweep over 64 and 32: the sweep's fresh pass at 32, the run's own side,
    equals the default (single-resolution) evaluation's fidelity; its 64 is the main pass's."""
    r = evaluate(EvalConfig(store=eval_setup.store, run=eval_setup.run, out=tmp_path / "e", resolution=64,
                            resolutions=(64, 32), throughput=False, sam=False, pictures=1, probe_images=4, max_bank=8,
                            **FAST), progress=False)
    sweep = r["fidelity_by_resolution"]
    assert sweep["resolutions"] == [32, 64] and sweep["trained"] == [32] and sweep["samples"] == r["fidelity"]["samples"]
    for t in TEACHERS:
        at, single, main = sweep["teachers"][t], evaluated.report["fidelity"]["teachers"][t], r["fidelity"]["teachers"][t]
        for target in ("summary", "spatial"):
            if single[target] is None:
                assert at[target] == [None, None]
                continue
            assert at[target][0] == pytest.approx(single[target], abs=1e-6)
            assert at[target][1] == pytest.approx(main[target], abs=1e-12)
        assert at["spatial"][0] != pytest.approx(at["spatial"][1], abs=1e-4)  # the side changes what the student sees
    assert r["pictures"]["resolutions"] == "fidelity_resolution.png"
    with Image.open(tmp_path / "e" / "fidelity_resolution.png") as im:
        assert im.size[0] > 0
    assert "## Fidelity by resolution" in (tmp_path / "e" / "report.md").read_text()
    assert "fidelity_by_resolution" not in evaluated.report  # only when asked for


def test_a_multi_resolution_run_evaluates_at_each_of_its_sides(eval_setup, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(store=eval_setup.store, out=run, student="test_vit", steps=4, batch_size=8, resolution=(32, 64),
                      workers=0, device="cpu", holdout=HOLDOUT, log_every=2), progress=False)
    r = evaluate(EvalConfig(store=eval_setup.store, run=run, out=tmp_path / "e", throughput=False, sam=False,
                            pictures=1, probe_images=4, max_bank=8, **FAST), progress=False)
    sweep = r["fidelity_by_resolution"]
    assert r["resolution"] == 64 and sweep["resolutions"] == sweep["trained"] == [32, 64]
    assert sweep["teachers"]["clip"]["spatial"][1] == r["fidelity"]["teachers"]["clip"]["spatial"]
    assert "trained at 32, 64 px" in (tmp_path / "e" / "report.md").read_text()


def test_knn_for_backbone_adaptors_and_cached_teachers(evaluated):
    knn = evaluated.report["knn"]
    assert knn["k"] == 20 and knn["temperature"] == 0.07 and knn["queries"] > 0 and knn["bank"] > knn["queries"]
    assert sorted(knn["teachers"]) == ["clip", "dinov2"]  # SAM has no summary
    values = [knn["student_backbone"]] + [v for t in knn["teachers"].values() for v in t.values()]
    assert all(0 <= v <= 1 for v in values)


def test_zero_shot_teacher_and_student_through_stored_text(evaluated):
    z = evaluated.report["zero_shot"]["teachers"]["clip"]
    assert z["classes"] == 4 and z["templates"] >= 1 and 0 <= z["teacher"] <= 1 and 0 <= z["student"] <= 1


def test_dense_probe_miou_for_student_and_every_teacher(evaluated):
    d = evaluated.report["dense"]
    assert d["classes"] == 5 and d["train_images"] > 0 and d["test_images"] > 0
    assert d["student_backbone"]["grid"] == [2, 2] and 0 <= d["student_backbone"]["miou"] <= 1
    assert all(0 <= d["teachers"][t]["teacher"] <= 1 for t in TEACHERS)


def test_throughput_of_student_and_teacher_architectures(evaluated):
    p = evaluated.report["throughput"]
    assert p["student"]["images_per_s"] > 0 and p["dtype"] == "fp32"
    for t in TEACHERS:
        assert p["teachers"][t]["images_per_s"] > 0, p["teachers"][t]
    assert p["teachers"]["sam"]["architecture"] == "samvit_base_patch16"


def test_sam_mask_iou_of_the_student_next_to_the_teachers_own(evaluated):
    s = evaluated.report["sam"]
    assert s["images"] == evaluated.report["split"]["held_out"] and s["prompts_per_image"] == 16
    v = s["teachers"]["sam"]
    assert v["grid"] == v["stored_grid"] == [8, 8] and v["teacher"]["min"] == 1.0  # the cached features, decoded twice
    d = v["student"]
    assert 0 <= d["min"] <= d["q1"] <= d["median"] <= d["q3"] <= d["max"] <= 1 and d["min"] <= d["mean"] <= d["max"]
    assert evaluated.report["pictures"]["sam"] == "sam_iou.png"
    assert "## SAM mask IoU" in (evaluated.out / "report.md").read_text()


def test_pictures_are_written_and_readable(evaluated):
    for name in ("features.png", "curves.png", "sam_iou.png"):
        with Image.open(evaluated.out / name) as im:
            im.load()
            assert im.size[0] > 0 and im.size[1] > 0


def test_queries_are_held_out_and_the_bank_is_train_split(evaluated, eval_setup):
    reader = CacheReader(eval_setup.store)
    (what_q, queries), (what_b, bank) = evaluated.calls
    assert what_q == "held-out" and what_b == "train bank"
    assert queries and all(is_held_out(reader.ids[i], HOLDOUT) for i in queries)
    assert bank and not any(is_held_out(reader.ids[i], HOLDOUT) for i in bank)
    assert sorted(queries) == reader.indices(holdout=HOLDOUT, split="holdout").tolist()
    assert evaluated.report["split"]["held_out"] == len(queries)


def test_evaluation_imports_only_sams_decoder_and_without_the_sam_metric_no_teacher(evaluated, eval_setup):
    assert any(m.startswith("segment_anything") for m in evaluated.loaded)  # prompt encoder + mask decoder
    assert not any(m.startswith("open_clip") for m in evaluated.loaded)
    bare = evaluate_in_subprocess(eval_setup, eval_setup.root / "eval_nosam", sam=False, throughput=False, pictures=1,
                                  probe_images=4, max_bank=8)
    assert bare.loaded == []
    assert bare.report["sam"] == {"skipped": "turned off (--no-sam)"} and "sam" not in bare.report["pictures"]


def test_bank_cap_is_deterministic(eval_setup, tmp_path):
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=tmp_path / "a", max_bank=7, throughput=False,
                     pictures=1, probe_images=4, **FAST)
    a = evaluate(cfg, progress=False)
    b = json.loads(json.dumps(evaluate(EvalConfig(**{**cfg.__dict__, "out": tmp_path / "b"}), progress=False)))
    assert a["split"]["bank"] == 7 and a["knn"] == b["knn"] and a["dense"] == b["dense"]
    assert a["throughput"] == {"skipped": "turned off (--no-throughput)"}


def test_cli_help_and_a_real_run_without_text_embeddings(eval_setup, tmp_path):
    runner = CliRunner()
    result = runner.invoke(eval_app, ["--help"])
    assert result.exit_code == 0 and "--max-bank" in result.output and "--sam-checkpoint" in result.output
    assert "--instances" in result.output
    store = tmp_path / "notext.zarr"
    shutil.copytree(eval_setup.store, store)
    shutil.rmtree(store / "teachers" / "clip" / "text")
    out = tmp_path / "eval"
    result = runner.invoke(eval_app, [str(store), str(eval_setup.run), "--out", str(out), "--workers", "0",
                                      "--device", "cpu", "--no-throughput", "--pictures", "2", "--probe-steps", "20",
                                      "--sam-images", "3", "--instances", str(eval_setup.root / "data" / "instances")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert "radio-cache text" in report["zero_shot"]["skipped"]
    assert "radio-cache text" in (out / "report.md").read_text()
    assert "skipped zero_shot" in result.output.replace("\n", " ")
    assert report["sam"]["images"] == 3 and "sam_iou.png" in result.output and "sam_masks.png" in result.output
    assert report["sam"]["teachers"]["sam"]["ground_truth"]["images"] <= 3


def test_cli_errors_are_one_line(eval_setup, tmp_path):
    runner = CliRunner()
    result = runner.invoke(eval_app, [str(eval_setup.store), str(tmp_path), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "no run.json" in result.output and "Traceback" not in result.output
    result = runner.invoke(eval_app, [str(eval_setup.store), str(eval_setup.run), "--out", str(tmp_path / "e"),
                                      "--masks", str(tmp_path / "none")])
    assert result.exit_code == 2 and "--masks" in result.output
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"x")
    result = runner.invoke(eval_app, [str(eval_setup.store), str(eval_setup.run), "--out", str(tmp_path / "e"),
                                      "--sam-checkpoint", str(ckpt)])
    assert result.exit_code == 2 and "tiny preset" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "e").exists()


def test_an_out_under_a_file_and_a_throughput_batch_of_millions_are_one_line(tmp_path):
    (tmp_path / "f.txt").write_text("keep me")
    for args, message in ((["--out", str(tmp_path / "f.txt" / "e")], f"--out '{tmp_path / 'f.txt' / 'e'}' lies under "),
                          (["--out", str(tmp_path / "e"), "--throughput-batch", "10000000"],  # was a traceback at the end
                           "--throughput-batch 10000000: at most 4096")):
        result = CliRunner().invoke(eval_app, [str(tmp_path / "s.zarr"), str(tmp_path / "run"), *args])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
        assert len(result.output.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_a_throughput_batch_the_device_cannot_hold_is_one_line():
    with pytest.raises(EvaluationError, match="^--throughput-batch 4096: out of memory at 100000 px on cpu; give a"):
        images_per_second(torch.nn.Identity(), resolution=100_000, batch=4096, device=torch.device("cpu"))


def test_unlabelled_store_skips_knn_and_zero_shot(eval_setup, tmp_path, record_again):
    import zarr
    store = tmp_path / "unlabelled.zarr"
    shutil.copytree(eval_setup.store, store)
    labels = zarr.open_group(store, mode="r+")["samples/labels"]
    labels[:] = np.full(labels.shape, -1, dtype=np.int32)
    record_again(store, "samples/labels")  # as a build of an unlabelled dataset writes them
    r = evaluate(EvalConfig(store=store, run=eval_setup.run, out=tmp_path / "e", throughput=False, pictures=1,
                            probe_images=4, **FAST), progress=False)
    assert "unlabelled" in r["knn"]["skipped"] and "unlabelled" in r["zero_shot"]["skipped"]
    assert "skipped" not in r["dense"] and "skipped" not in r["fidelity"]


def test_a_run_from_another_store_is_refused(eval_setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(eval_setup.run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["store_settings"]["seed"] = 12345
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(EvaluationError, match="other teachers or settings"):
        evaluate(EvalConfig(store=eval_setup.store, run=run, out=tmp_path / "e", **FAST), progress=False)


@pytest.mark.parametrize("args, option", [
    (["--pictures", "0"], "--pictures 0"), (["--max-bank", "0"], "--max-bank 0"), (["--k", "0"], "--k 0"),
    (["--probe-images", "0"], "--probe-images 0"), (["--probe-steps", "0"], "--probe-steps 0"),
    (["--batch-size", "0"], "--batch-size 0"), (["--workers", "-1"], "--workers -1"),
    (["--resolution", "0"], "--resolution 0"), (["--throughput-batch", "0"], "--throughput-batch 0"),
    (["--device", "tpu"], "--device 'tpu'"), (["--device", "cuda"], "--device cuda"),
    (["--device", "cuda:7"], "--device cuda:7"), (["--sam-images", "0"], "--sam-images 0"),
    (["--resolutions", "32,x"], "--resolutions '32,x'"), (["--resolutions", "32,0"], "--resolutions 0"),
    (["--resolutions", "32,20"], "--resolutions 20 is not a multiple of 16"),
])
def test_silly_option_values_give_one_line_and_create_nothing(eval_setup, tmp_path, monkeypatch, args, option):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    out = tmp_path / "eval"
    result = CliRunner().invoke(eval_app, [str(eval_setup.store), str(eval_setup.run), "--out", str(out),
                                           "--workers", "0", "--no-throughput", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {option}") and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_an_empty_held_out_split_says_why_and_what_to_do(eval_setup, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(eval_setup.run, run)
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["holdout"] = 1e-9  # like --holdout 0.05 on a one-image store: nothing falls below it
    (run / "run.json").write_text(json.dumps(meta))
    usable = len(CacheReader(eval_setup.store).indices(holdout=0.0))
    with pytest.raises(EvaluationError, match=rf"held-out split of run .* is empty: --holdout 1e-09 of the {usable} "
                                              r"usable samples .* holds out none .* larger --holdout"):
        evaluate(EvalConfig(store=eval_setup.store, run=run, out=tmp_path / "e", **FAST), progress=False)


def test_images_points_the_store_at_a_moved_dataset(eval_setup, tmp_path):
    import zarr
    store = tmp_path / "moved.zarr"
    shutil.copytree(eval_setup.store, store)
    root = zarr.open_group(store, mode="r+")
    root.attrs["dataset"] = {**root.attrs["dataset"], "root": str(tmp_path / "gone")}  # the images moved away
    cfg = dict(store=store, run=eval_setup.run, throughput=False, pictures=1, probe_images=4, **FAST)
    with pytest.raises(DatasetError, match="--images"):
        evaluate(EvalConfig(out=tmp_path / "a", **cfg), progress=False)
    moved = evaluate(EvalConfig(out=tmp_path / "b", images=eval_setup.images, **cfg), progress=False)
    same = evaluate(EvalConfig(out=tmp_path / "c", **{**cfg, "store": eval_setup.store}), progress=False)
    assert moved["fidelity"] == same["fidelity"] and moved["split"] == same["split"]
