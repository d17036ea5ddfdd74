"""The student as SAM's image encoder, and the mask-agreement metric behind `radio-eval --sam`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radio_distill.errors import EvaluationError
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.evaluate.features import SplitFeatures
from radio_distill.evaluate.report import sam_scores, sam_decoders
from radio_distill.evaluate.sam import mask_iou, object_points, prompt_masks, sam_model, sam_predictor, to_sam_grid
from radio_distill.student import load_student

from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

from .conftest import FAST, HOLDOUT


def test_sam_predictor_runs_unchanged_on_the_student(eval_setup):
    predictor = sam_predictor(eval_setup.run)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 48, 80) and masks.dtype == bool and scores.shape == (3,)
    assert predictor.features.shape == (1, 32, 8, 8)  # the tiny SAM's embedding grid and channels


def test_encoder_is_the_students_sam_adaptor(eval_setup):
    """SAM's preprocessing undone and the student's applied: same map as calling the student directly."""
    sam = sam_model(eval_setup.run)
    student = load_student(eval_setup.run)
    pixels = torch.rand(2, 3, 64, 64) * 255  # the tiny SAM's input side, no padding
    got = sam.image_encoder(sam.preprocess(pixels))
    x = (pixels / 255 - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)  # the run's resolution
    with torch.no_grad():
        want = F.interpolate(student(x).teachers["sam"].spatial, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_upsampled_sam_head_feeds_the_decoder_at_its_own_grid(eval_setup, tmp_path):
    """`--upsample sam=4` at 32 px: the student's 2 x 2 grid drawn as 8 x 8, SAM's own grid, goes to the decoder
    as the head drew it (no bilinear resize), through the run's saved student."""
    run = tmp_path / "run"
    train(TrainConfig(store=eval_setup.store, out=run, student="test_vit", steps=2, batch_size=8, resolution=32,
                      workers=0, device="cpu", holdout=HOLDOUT, upsample={"sam": 4}), progress=False)
    student = load_student(run)
    assert student.teachers["sam"].upsample == 4
    sam = sam_model(run)
    pixels = torch.rand(2, 3, 64, 64) * 255
    x = (pixels / 255 - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        want = student(x).teachers["sam"].spatial  # (2, 32, 8, 8)
        got = sam.image_encoder(sam.preprocess(pixels))
    assert want.shape == (2, 32, 8, 8) and student(x).backbone.spatial.shape[-2:] == (2, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_teacher_features_agree_with_themselves(eval_setup):
    sam = sam_model(eval_setup.run)
    emb = torch.randn(3, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = prompt_masks(sam, emb, points=3, seed=1)
    assert ref.shape == (3, 9, 32, 32)
    assert mask_iou(ref, prompt_masks(sam, emb.clone(), points=3, seed=1)).eq(1).all()
    other = prompt_masks(sam, torch.randn(3, 32, 8, 8, generator=torch.Generator().manual_seed(5)), points=3, seed=1)
    assert mask_iou(ref, other).mean() < 1


def test_mask_iou_known_values():
    a = torch.zeros(3, 2, 2, dtype=torch.bool)
    b = a.clone()
    a[0, 0, 0] = b[0, 0, 0] = True   # same single pixel: 1
    a[1, 0] = True; b[1, :, 0] = True  # {(0,0),(0,1)} vs {(0,0),(1,0)}: 1/3
    # a[2], b[2] empty: 1 by definition
    assert mask_iou(a, b).tolist() == pytest.approx([1.0, 1 / 3, 1.0])


def test_wrong_checkpoint_is_refused(eval_setup, tmp_path, monkeypatch):
    import json
    run = tmp_path / "run"
    run.mkdir()
    meta = json.loads((eval_setup.run / "run.json").read_text())
    for t in meta["store_settings"]["teachers"].values():
        if t["family"] == "sam":
            t.update(preset=None, model="vit_b", weights="sam_vit_b.pth", sha256="0" * 64)
    (run / "run.json").write_text(json.dumps(meta))
    (run / "student").symlink_to(eval_setup.run / "student")
    with pytest.raises(EvaluationError, match="pass its checkpoint file"):
        sam_model(run)
    other = tmp_path / "other.pth"
    other.write_bytes(b"not sam")
    with pytest.raises(EvaluationError, match="is not the file teacher 'sam' was cached from"):
        sam_model(run, other)


def test_pooled_targets_and_student_maps_are_resized_to_sams_grid(eval_setup):
    """A store pooled 8x8 -> 4x4: the cached map is resized to SAM's 8x8 grid; a student equal to the
    pooled map (at its own 4x4 grid) draws the same masks, its negation does not."""
    sam = sam_model(eval_setup.run)
    target = torch.randn(3, 4, 4, 32, generator=torch.Generator().manual_seed(0)).half()  # (Ms, ht, wt, C)
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=eval_setup.root / "unused")
    for sign, check in ((1, lambda d: d["min"] == 1.0), (-1, lambda d: d["mean"] < 0.9)):
        feats = SplitFeatures(indices=np.arange(3), labels=np.zeros(3), backbone_summary=None, sam_rows=np.arange(3),
                              sam_target={"sam": target.numpy()},
                              sam_student={"sam": (sign * target).permute(0, 3, 1, 2).numpy()})
        section, ious = sam_scores(feats, {"sam": sam}, [], cfg)
        v = section["teachers"]["sam"]
        assert v["grid"] == [8, 8] and v["stored_grid"] == [4, 4] and v["teacher"]["min"] == 1.0
        assert check(v["student"]), v["student"]
    assert to_sam_grid(target.permute(0, 3, 1, 2), (8, 8)).shape == (3, 32, 8, 8)


def test_sam_decoders_say_why_a_sam_teacher_is_left_out(eval_setup, tmp_path):
    settings = {"teachers": {"clip": {"family": "clip"},
                             "sam_pre": {"family": "sam", "model": "tiny", "preset": "tiny", "spatial": "preneck"},
                             "sam_h": {"family": "sam", "model": "vit_h", "preset": None, "spatial": "neck"}}}
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=tmp_path)
    sams, notes = sam_decoders(cfg, SimpleNamespace(store_settings=settings), "cpu")
    assert sams == {} and len(notes) == 2
    assert "sam_pre: cached pre-neck" in notes[0] and "sam_h (vit_h): pass its checkpoint with --sam-checkpoint" in notes[1]
    none, why = sam_decoders(cfg, SimpleNamespace(store_settings={"teachers": {"clip": {"family": "clip"}}}), "cpu")
    assert none == {} and why == ["the store has no SAM teacher"]


def test_a_real_sam_teacher_needs_its_checkpoint_and_then_scores_the_same(eval_setup, evaluated, tmp_path):
    """The tiny store and run re-labelled as built from a SAM checkpoint file (the tiny SAM's own
    weights): skipped without --sam-checkpoint; with the file, the same masks as the seeded decoder."""
    import json
    import shutil

    import zarr

    from radio_distill.cache.teachers import build_teacher, sha256_file, tiny_teachers
    from radio_distill.evaluate import evaluate

    checkpoint = tmp_path / "sam_tiny.pth"
    torch.save(build_teacher(next(s for s in tiny_teachers() if s.family == "sam")).model.state_dict(), checkpoint)
    real = {"preset": None, "random_init": False, "weights": checkpoint.name, "sha256": sha256_file(checkpoint)}
    store, run = tmp_path / "cache.zarr", tmp_path / "run"
    shutil.copytree(eval_setup.store, store)
    shutil.copytree(eval_setup.run, run)
    root = zarr.open_group(store, mode="r+")
    settings = root.attrs["settings"]
    settings["teachers"]["sam"].update(real)
    root.attrs["settings"] = settings
    meta = json.loads((run / "run.json").read_text())
    meta["store_settings"]["teachers"]["sam"].update(real)
    (run / "run.json").write_text(json.dumps(meta))
    cfg = dict(store=store, run=run, throughput=False, pictures=1, probe_images=4, max_bank=8, **FAST)
    skipped = evaluate(EvalConfig(out=tmp_path / "a", **cfg), progress=False)
    assert "sam (tiny): pass its checkpoint with --sam-checkpoint FILE" in skipped["sam"]["skipped"]
    scored = evaluate(EvalConfig(out=tmp_path / "b", sam_checkpoint=checkpoint, **cfg), progress=False)
    got, want = scored["sam"]["teachers"]["sam"], evaluated.report["sam"]["teachers"]["sam"]
    assert got["grid"] == want["grid"] and scored["sam"]["images"] == evaluated.report["sam"]["images"]
    for who in ("student", "teacher"):
        assert got[who] == pytest.approx(want[who], abs=1e-6), who
    assert sam_predictor(run, checkpoint).model.image_encoder.teacher == "sam"


def test_ground_truth_iou_of_the_tiny_run_with_teacher_and_student(evaluated):
    """eval_setup's dataset has instances/ (each sample's shape is object 1): every held-out image with
    an instance mask is prompted once per object, teacher and student on the same prompts."""
    s = evaluated.report["sam"]
    truth = s["teachers"]["sam"]["ground_truth"]
    assert 0 < truth["images"] <= s["images"] and truth["objects"] == truth["images"]  # one shape per image
    assert 0 <= truth["teacher"] <= 1 and 0 <= truth["student"] <= 1
    assert evaluated.report["pictures"]["sam_masks"] == "sam_masks.png"
    md = (evaluated.out / "report.md").read_text()
    row = f"| {evaluated.report['teachers']['sam']} | {truth['images']} | {truth['objects']} |"
    assert row in md and "(sam_masks.png)" in md


def test_ground_truth_iou_known_answers_on_the_tiny_sam(eval_setup):
    """A student equal to the cached map (pooled 4x4 here) scores exactly the teacher's IoU; a square
    object at the image's centre is prompted at its centre; images without instance masks are left out."""
    sam = sam_model(eval_setup.run)
    target = torch.randn(3, 4, 4, 32, generator=torch.Generator().manual_seed(0)).half()  # (Ms, ht, wt, C)
    at_s = torch.zeros(64, 64, dtype=torch.long)
    at_s[16:47, 16:47] = 1  # 31 x 31: its deepest pixel is the centre one
    native = torch.zeros(96, 96, dtype=torch.long)
    native[24:71, 24:71] = 1
    assert object_points(at_s, native)[1].tolist() == [[31.5, 31.5]]
    maps = {64: [(at_s, native), None, (at_s, native)]}
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=eval_setup.root / "unused")
    for student, same in ((target.permute(0, 3, 1, 2), True), (torch.zeros(3, 32, 4, 4), False)):
        feats = SplitFeatures(indices=np.arange(3), labels=np.zeros(3), backbone_summary=None, sam_rows=np.arange(3),
                              sam_target={"sam": target.numpy()}, sam_student={"sam": student.numpy()})
        truth = sam_scores(feats, {"sam": sam}, [], cfg, objects=maps)[0]["teachers"]["sam"]["ground_truth"]
        assert truth["images"] == 2 and truth["objects"] == 2
        assert (truth["student"] == truth["teacher"]) == same, truth
    no_masks = sam_scores(feats, {"sam": sam}, [], cfg, objects={}, objects_note="no instance masks: ...")[0]
    assert no_masks["teachers"]["sam"]["ground_truth"] == {"skipped": "no instance masks: ..."}


def test_without_instance_masks_the_ground_truth_is_skipped_with_the_reason(eval_setup, tmp_path):
    cfg = dict(store=eval_setup.store, run=eval_setup.run, throughput=False, pictures=1, probe_images=4, max_bank=8,
               **FAST)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = evaluate(EvalConfig(out=tmp_path / "a", instances=empty, **cfg), progress=False)
    assert "no instance masks under" in r["sam"]["teachers"]["sam"]["ground_truth"]["skipped"]
    assert "sam_masks" not in r["pictures"] and r["sam"]["teachers"]["sam"]["student"]["mean"] >= 0  # agreement stays
    assert "skipped: no instance masks under" in (tmp_path / "a" / "report.md").read_text()
    with pytest.raises(EvaluationError, match="--instances '.*nowhere' is not a folder"):
        evaluate(EvalConfig(out=tmp_path / "b", instances=tmp_path / "nowhere", **cfg), progress=False)
