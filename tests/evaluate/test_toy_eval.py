"""`radio-eval` on a `--teachers toy` store: the toy weight files are found without flags (SAM for the
mask metric, CLIP for `radio-cache text`), SAM's point-prompt mask IoU against the scenes' instance
masks is reported for teacher and student, and a moved or changed file is said in one line.

The toy weights here are made in the test: CLIP and DINOv2 untrained (seeded), SAM trained for 60
short steps (about 10 s on one thread) so that its masks mean something; the final toy weights are
not needed. The tests on a built toy store and run (a Ray build, training, radio-eval: about a
minute) are `slow`; the known answers of the ground-truth IoU need only the weights. The same logic
on the tiny preset (no weight files) is in the quick set: test_sam.py, tests/cache/test_teachers.py.
"""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.teachers import TOY_SIDES, build_toy_sam, sha256_file, toy_teachers
from radio_distill.cache.text import write_text_embeddings
from radio_distill.cache.toy import fit
from radio_distill.cache.toy.data import make_views, resize_mask
from radio_distill.cache.toy.score import features
from radio_distill.cache.toy.train_toy_teachers import new_clip, new_dinov2, save
from radio_distill.cache.world import make_scenes, write_scenes
from radio_distill.cli import cache_app
from radio_distill.errors import EvaluationError, TeacherSpecError
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.evaluate.report import ground_truth_iou
from radio_distill.evaluate.sam import sam_model, sam_predictor
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

from .conftest import FAST


@pytest.fixture(scope="module")
def toy_weights(tmp_path_factory):
    """A folder of toy weight files as the trainer writes them; SAM briefly trained (see the docstring)."""
    folder = tmp_path_factory.mktemp("toy_weights")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        clip, dinov2, sam = new_clip()[0], new_dinov2(), build_toy_sam()
        scenes = make_scenes(120, seed=0)
        fit.fit_sam(sam, make_views(scenes, TOY_SIDES["sam"], crops=1), steps=60, batch=8)
    finally:
        torch.set_num_threads(threads)
    for name, model in (("clip", clip), ("dinov2", dinov2), ("sam", sam)):
        save(model, folder / f"{name}.safetensors", note="test")
    return folder


@pytest.fixture(scope="module")
def toy_run(toy_weights, tmp_path_factory):
    """Scenes (instances/ beside images/), a store by the toy preset from `toy_weights`, its CLIP text
    embeddings (no --weights), a short run, and radio-eval without --sam-checkpoint."""
    root = tmp_path_factory.mktemp("toy_eval")
    images = write_scenes(root / "scenes", images=28, seed=3)
    cfg = CacheConfig(data=images, out=root / "toy.zarr", teachers=tuple(toy_teachers(toy_weights)), views=1,
                      shard_size=8, workers=2)
    assert build_cache(cfg, progress=False)["complete"]
    write_text_embeddings(cfg.out, device="cpu")  # finds clip.safetensors where the build did
    train(TrainConfig(store=cfg.out, out=root / "run", student="test_vit", steps=4, batch_size=8, resolution=32,
                      workers=0, device="cpu", holdout=0.5, log_every=2), progress=False)
    eval_cfg = dict(store=cfg.out, run=root / "run", throughput=False, pictures=2, probe_images=6, max_bank=8, **FAST)
    report = evaluate(EvalConfig(out=root / "eval", **eval_cfg), progress=False)
    return SimpleNamespace(root=root, store=cfg.out, run=root / "run", report=report, eval_cfg=eval_cfg)


@pytest.mark.slow
def test_build_records_where_it_found_the_weight_files(toy_run, toy_weights):
    root = zarr.open_group(toy_run.store, mode="r")
    assert root.attrs["weight_files"] == {f: str(toy_weights / f"{f}.safetensors") for f in ("clip", "dinov2", "sam")}
    ident = root.attrs["settings"]["teachers"]["sam"]
    assert ident["preset"] == "toy" and ident["weights"] == "sam.safetensors"  # the identity names no folder


@pytest.mark.slow
def test_radio_eval_reports_sam_against_ground_truth_without_flags(toy_run):
    r = toy_run.report
    assert "skipped" not in r["sam"] and "skipped" not in r["zero_shot"], (r["sam"], r["zero_shot"])
    truth = r["sam"]["teachers"]["sam"]["ground_truth"]
    assert 0 < truth["images"] <= r["sam"]["images"] and truth["objects"] >= truth["images"]
    assert truth["teacher"] > 0.15 and 0 <= truth["student"] <= 1  # SAM's 60 steps learnt something; 4 student steps not
    md = (toy_run.root / "eval" / "report.md").read_text()
    assert "| teacher | images | objects | teacher (cached) | student (adaptor) | student/teacher |" in md
    assert r["pictures"]["sam_masks"] == "sam_masks.png" and "(sam_masks.png)" in md
    for section, row in (("knn", "dinov2"), ("zero_shot", "clip"), ("dense", "dinov2")):
        assert {"teacher", "student"} <= set(r[section]["teachers"][row]), section


@pytest.mark.slow
def test_sam_predictor_finds_the_toy_checkpoint(toy_run):
    predictor = sam_predictor(toy_run.run)
    predictor.set_image(torch.randint(0, 256, (100, 140, 3), dtype=torch.uint8).numpy())
    masks, _, _ = predictor.predict(point_coords=np.array([[70, 50]]), point_labels=np.array([1]))
    assert masks.shape == (3, 100, 140) and predictor.features.shape == (1, 64, 16, 16)


@pytest.fixture
def one_thread():
    """Many small decoder calls: on a shared 2-core machine two threads spend most of it at barriers (0.3 s vs 19 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_teachers_own_embedding_scores_as_the_teacher_and_zeros_far_lower(toy_weights, one_thread):
    """Known answers of the ground-truth IoU: a student that is the teacher scores exactly the
    teacher's IoU; zero embeddings lose the objects."""
    from radio_distill.cache.teachers import TeacherSpec, build_teacher

    teacher = build_teacher(TeacherSpec("sam", "sam", "toy", weights=str(toy_weights / "sam.safetensors"),
                                        resolution=128, preset="toy"))
    scenes = make_scenes(12, seed=5)
    views = make_views(scenes, 128)
    emb = features(teacher, views.pixels)[1].permute(0, 3, 1, 2)  # (N, C, g, g): what the store caches for SAM
    maps = []
    for n, (k, box) in enumerate(zip(views.scene, views.box)):
        side = int(round(float(box[2] - box[0])))
        maps.append((views.instances[n], torch.from_numpy(resize_mask(scenes[k].instances, box, (side, side)))))
    same = ground_truth_iou(teacher.model, emb, emb.clone(), maps)
    assert same["student"] == same["teacher"] and same["objects"] > 12 and same["teacher"] > 0.15, same
    zeros = ground_truth_iou(teacher.model, emb, torch.zeros_like(emb), maps)
    assert zeros["teacher"] == same["teacher"] and zeros["student"] < 0.25 * same["teacher"], zeros


def _moved(toy_run, tmp_path, recorded: dict) -> SimpleNamespace:
    """A copy of the store and run whose build recorded other weight paths."""
    store, run = tmp_path / "toy.zarr", tmp_path / "run"
    shutil.copytree(toy_run.store, store)
    shutil.copytree(toy_run.run, run)
    zarr.open_group(store, mode="r+").attrs["weight_files"] = recorded
    meta = json.loads((run / "run.json").read_text())
    meta["store"] = str(store)
    (run / "run.json").write_text(json.dumps(meta))
    return SimpleNamespace(store=store, run=run)


@pytest.mark.slow
def test_a_moved_or_changed_weight_file_is_one_line(toy_run, toy_weights, tmp_path, monkeypatch):
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes((toy_weights / "sam.safetensors").read_bytes()[:-1] + b"x")
    gone = tmp_path / "gone" / "clip.safetensors"
    moved = _moved(toy_run, tmp_path, {"sam": str(changed), "clip": str(gone)})
    with pytest.raises(EvaluationError, match=rf"weight file 'sam.safetensors' \(sha256 .{{12}}\.\.\.\) is not where it "
                                              rf"was: {changed} \(changed\).*pass its checkpoint file"):
        sam_model(moved.run)
    cfg = {**toy_run.eval_cfg, "store": moved.store, "run": moved.run, "pictures": 1}
    skipped = evaluate(EvalConfig(out=tmp_path / "eval", **cfg), progress=False)["sam"]["skipped"]
    assert f"{changed} (changed)" in skipped and "--sam-checkpoint FILE" in skipped
    text = CliRunner().invoke(cache_app, ["text", str(moved.store), "--device", "cpu"])
    assert text.exit_code == 2 and len(text.output.strip().splitlines()) == 1, text.output
    with pytest.raises(TeacherSpecError, match=rf"not at {re.escape(str(gone))} \(missing\), .*; pass --weights PATH"):
        write_text_embeddings(moved.store, device="cpu")
    # the toy preset's own folder is looked in too (cache/toy/ in the package; here the test's folder)
    monkeypatch.setattr("radio_distill.cache.teachers.TOY_DIR", toy_weights)
    assert sam_model(moved.run).image_encoder.teacher == "sam"
    assert CliRunner().invoke(cache_app, ["text", str(moved.store), "--device", "cpu"]).exit_code == 0
    # --sam-checkpoint still decides when given
    assert sha256_file(toy_weights / "sam.safetensors") != sha256_file(changed)
    with pytest.raises(EvaluationError, match="is not the file teacher 'sam' was cached from"):
        sam_model(moved.run, changed)
