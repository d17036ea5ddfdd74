"""SAM 2's and SAM 3's decoders under the mask-IoU metric (`PromptSide`), and the student as SAM 2's image
encoder (`sam2_predictor`): known answers against each library's own predictor."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from radio_distill.cache.build import build_cache
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import TeacherSpec, build_teacher
from radio_distill.errors import EvaluationError
from radio_distill.evaluate.sam import (PromptSide, mask_iou, object_points, point_masks, point_prompt_iou,
                                        prompt_masks, sam2_model, sam2_predictor, sam3_model)
from radio_distill.student import load_student
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

from .conftest import FAST

SAM2_TINY = TeacherSpec("sam2", "sam2", "tiny", resolution=128, random_init=True)
SAM3_TINY = TeacherSpec("sam3", "sam3", "tiny", resolution=112, random_init=True)


def _square(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(instances at SAM's side, the same at the native side): one square object off centre."""
    at_s = torch.zeros(side, side, dtype=torch.long)
    at_s[side // 8: side // 2, side // 4: 3 * side // 4] = 1
    return at_s, at_s.clone()


def _sam2_predictor(model):
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # the tiny model's 128 px (the predictor assumes 1024)
    return predictor


def test_sam2_decoder_gives_the_predictors_masks_and_iou():
    """The teacher's own embedding through `PromptSide`: the masks and ground-truth IoU of
    `SAM2ImagePredictor.predict` on the same point prompts, exactly."""
    model = build_teacher(SAM2_TINY).model
    image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    predictor = _sam2_predictor(model)
    predictor.set_image(image)
    at_s, native = _square(128)
    ids, points = object_points(at_s, native, min_pixels=1)
    points = torch.cat([points, torch.tensor([[20.0, 100.0], [110.0, 30.0]])])  # and two more prompts
    want = torch.stack([torch.from_numpy(predictor.predict(point_coords=p[None].numpy(), point_labels=np.array([1]),
                                                           multimask_output=False)[0][0]).bool() for p in points])
    side = PromptSide(model)
    f = predictor._features
    with pytest.raises(EvaluationError, match="reads the high-resolution levels s0, s1 beside the image embedding: "
                                              "give the three packed by PromptSide.pack \\(128 channels\\), not 32"):
        point_masks(side, f["image_embed"][0], points, (128, 128))
    emb = side.pack(f["image_embed"], f["high_res_feats"][1], f["high_res_feats"][0])[0]
    unpacked, (s0, s1) = side.unpack(emb[None])
    assert torch.equal(unpacked, f["image_embed"]) and torch.equal(s0, f["high_res_feats"][0])
    assert torch.equal(s1, f["high_res_feats"][1])
    with torch.no_grad():
        got = point_masks(side, emb, points, (128, 128))
    assert got.shape == want.shape and torch.equal(got, want) and 0.02 < want.float().mean() < 0.98
    iou = point_prompt_iou(side, emb, at_s, native, min_pixels=1)
    assert iou.tolist() == pytest.approx(mask_iou(want[:1], native[None] == 1).tolist())
    assert prompt_masks(side, emb[None], points=2).shape == (1, 4, 32, 32)  # the agreement metric's grid


def test_sam3_decoder_gives_the_models_masks():
    """`Sam3TrackerModel.forward` on its own image embeddings and the processor's post-processing: the same
    masks as `PromptSide` on the same point prompts."""
    from transformers import Sam3TrackerProcessor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    model = build_teacher(SAM3_TINY).model
    image = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor(size={"height": 112, "width": 112}))
    points = [[30.0, 40.0], [90.0, 70.0], [56.0, 56.0]]
    inputs = processor(images=image, input_points=[[[p] for p in points]], input_labels=[[[1]] * 3],
                       return_tensors="pt")
    with torch.no_grad():
        embeddings = model.get_image_embeddings(inputs["pixel_values"])
        out = model(image_embeddings=embeddings, input_points=inputs["input_points"],
                    input_labels=inputs["input_labels"], multimask_output=False)
        want = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][:, 0]
        side = PromptSide(model)
        packed = side.pack(embeddings[-1], embeddings[1], embeddings[0])[0]
        got = point_masks(side, packed, torch.tensor(points), (112, 112))
    assert torch.equal(got, want) and 0.02 < want.float().mean() < 0.98


@pytest.fixture(scope="module")
def sam2_run(ray_session, tmp_path_factory):
    """A store of SAM 2's and SAM 3's three levels (tiny, weights from a checkpoint file and a save_pretrained
    folder) and a short run from it."""
    root = tmp_path_factory.mktemp("sam2_run")
    data = make_sample_dataset(root / "data", images=8, size=64)
    teacher, sam3 = build_teacher(SAM2_TINY), build_teacher(SAM3_TINY)
    checkpoint = root / "sam2_tiny.pt"
    torch.save({"model": teacher.model.state_dict()}, checkpoint)
    sam3.model.save_pretrained(root / "sam3_tiny")
    entries = []
    for name, prefix, spec in (("sam2", "", f"sam2:tiny:{checkpoint}@128"),
                               ("sam3", "sam3_", f"sam3:{root / 'sam3_tiny'}@112")):
        entries += [f"{name}={spec}", {"spec": f"{prefix}s1={spec}", "sam_spatial": "s1"},
                    {"spec": f"{prefix}s0={spec}", "sam_spatial": "s0"}]
    cfg = load_cache_config(data=data, out=root / "cache.zarr", teachers=entries, views=1, shard_size=4, workers=1)
    assert build_cache(cfg, progress=False)["complete"]
    train(TrainConfig(store=cfg.out, out=root / "run", student="test_vit", steps=2, batch_size=4, resolution=32,
                      holdout=0.5, workers=0, device="cpu", log_every=1), progress=False)
    return SimpleNamespace(root=root, store=cfg.out, run=root / "run", checkpoint=checkpoint, teacher=teacher,
                           sam3=sam3, sam3_folder=root / "sam3_tiny")


@pytest.mark.slow  # a Ray build and a short training run (~40 s)
def test_student_stands_in_for_sam2s_image_encoder(sam2_run):
    """`SAM2ImagePredictor` over the student: its features are the student's adaptor maps for the three
    levels (the embedding less no_mem_embed, which set_image adds back), and predict runs unchanged."""
    predictor = sam2_predictor(sam2_run.run)  # the checkpoint found where the build recorded it (sha256 checked)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([[40, 20]]), point_labels=np.array([1]))
    assert masks.shape == (3, 48, 80) and scores.shape == (3,)
    f = predictor._features
    assert f["image_embed"].shape == (1, 32, 8, 8)
    assert [tuple(h.shape) for h in f["high_res_feats"]] == [(1, 4, 32, 32), (1, 8, 16, 16)]

    student = load_student(sam2_run.run)
    t = sam2_run.teacher
    pixels = predictor._transforms(image)[None] * torch.tensor(t.std).view(1, 3, 1, 1) + torch.tensor(t.mean).view(
        1, 3, 1, 1)  # SAM 2's 128 px input, its normalisation undone
    x = (pixels - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        out = student(x).teachers
    for name, got in (("sam2", f["image_embed"]), ("s1", f["high_res_feats"][1]), ("s0", f["high_res_feats"][0])):
        want = torch.nn.functional.interpolate(out[name].spatial, size=got.shape[-2:], mode="bilinear",
                                               align_corners=False)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    with pytest.raises(EvaluationError, match="'s1' is not a SAM 2 image-embedding teacher"):
        sam2_model(sam2_run.run, teacher="s1")
    with pytest.raises(EvaluationError, match="is not the file teacher 'sam2' was cached from"):
        other = sam2_run.checkpoint.parent / "other.pt"
        other.write_bytes(b"not sam 2")
        sam2_model(sam2_run.run, other)


@pytest.mark.slow  # with sam2_run's build and training (~45 s)
def test_student_stands_in_for_sam3s_vision_encoder(sam2_run):
    """`Sam3TrackerModel` over the student: `get_image_embeddings` gives the student's adaptor maps for the
    three levels, and the model runs on the processor's point prompts unchanged."""
    from transformers import Sam3TrackerProcessor
    from transformers.models.sam3.image_processing_sam3 import Sam3ImageProcessor

    model = sam3_model(sam2_run.run)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    processor = Sam3TrackerProcessor(image_processor=Sam3ImageProcessor(size={"height": 112, "width": 112}))
    inputs = processor(images=image, input_points=[[[[40, 20]]]], input_labels=[[[1]]], return_tensors="pt")
    with torch.no_grad():
        masks = processor.post_process_masks(model(**inputs).pred_masks, inputs["original_sizes"])[0]
        got = model.get_image_embeddings(inputs["pixel_values"])
    assert masks.shape == (1, 3, 48, 80)
    student = load_student(sam2_run.run)
    x = inputs["pixel_values"] * 0.5 + 0.5  # the processor's 112 px input, its normalisation undone
    x = (x - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        out = student(x).teachers
    for name, level in (("sam3", 2), ("sam3_s1", 1), ("sam3_s0", 0)):
        want = torch.nn.functional.interpolate(out[name].spatial, size=got[level].shape[-2:], mode="bilinear",
                                               align_corners=False)
        torch.testing.assert_close(got[level], want, atol=1e-4, rtol=1e-4)
    (sam2_run.sam3_folder / "model.safetensors").rename(sam2_run.sam3_folder / "moved.safetensors")
    try:
        with pytest.raises(EvaluationError, match="no longer holds the weights it was cached from"):
            sam3_model(sam2_run.run)
    finally:
        (sam2_run.sam3_folder / "moved.safetensors").rename(sam2_run.sam3_folder / "model.safetensors")


@pytest.mark.slow  # with sam2_run's build and training (~45 s)
def test_radio_eval_scores_sam2_and_sam3_with_their_high_res_levels(sam2_run):
    """The SAM metric decodes the SAM 2 and SAM 3 teachers with their s0, s1 teachers' maps: the cached maps
    decoded again agree fully (the known answer), the student's are scored, the level teachers are noted."""
    r = evaluate(EvalConfig(store=sam2_run.store, run=sam2_run.run, out=sam2_run.root / "eval", throughput=False,
                            pictures=1, probe_images=4, max_bank=8, **FAST), progress=False)["sam"]
    assert sorted(r["teachers"]) == ["sam2", "sam3"]
    for name in ("sam2", "sam3"):
        v = r["teachers"][name]
        assert v["grid"] == [8, 8] and v["stored_grid"] == [8, 8]
        assert v["teacher"]["min"] == 1.0 and 0 <= v["student"]["mean"] <= 1
    assert r["notes"] == [f"{prefix}{level}: SAM {k}'s {level} level, decoded with its image-embedding teacher"
                          for k, prefix in (("2", ""), ("3", "sam3_")) for level in ("s1", "s0")]


def test_sam_decoders_say_why_a_sam2_or_sam3_teacher_is_left_out(tmp_path):
    """Without the teachers of its s0, s1 levels (or with its SAM 3 folder changed) the metric says so, in one line."""
    from radio_distill.cache.teachers import identity
    from radio_distill.evaluate.report import sam_decoders

    checkpoint, folder = tmp_path / "sam2_tiny.pt", tmp_path / "sam3_tiny"
    torch.save({"model": build_teacher(SAM2_TINY).model.state_dict()}, checkpoint)
    build_teacher(SAM3_TINY).model.save_pretrained(folder)
    sam2 = identity(replace(SAM2_TINY, weights=str(checkpoint), random_init=False))
    sam3 = identity(replace(SAM3_TINY, model=str(folder), random_init=False))
    settings = {"teachers": {"sam2": sam2, "sam3": sam3, "sam3_s0": {**sam3, "spatial": "s0"}}}
    cfg = EvalConfig(store=tmp_path, run=tmp_path, out=tmp_path)
    sams, notes = sam_decoders(cfg, SimpleNamespace(store_settings=settings), "cpu",
                               weight_files={"sam2": str(checkpoint)})
    assert sams == {} and notes == [
        "sam2 (tiny): its mask decoder reads the high-resolution levels s0, s1 beside the image embedding; the store "
        "has no teacher of the same model for s0, s1 (cache them with sam_spatial s0, s1)",
        "sam3 (" + str(folder) + "): its mask decoder reads the high-resolution levels s0, s1 beside the image "
        "embedding; the store has no teacher of the same model for s1 (cache them with sam_spatial s1)",
        "sam3_s0: SAM 3's s0 level, decoded with its image-embedding teacher"]
    (folder / "model.safetensors").unlink()
    notes = sam_decoders(cfg, SimpleNamespace(store_settings=settings), "cpu")[1]
    assert notes[0] == ("sam2 (tiny): the metric needs its checkpoint unchanged where the build read it "
                        "(--sam-checkpoint is SAM's)")
    assert "SAM 3 teacher 'sam3': the folder '" + str(folder) + "' no longer holds the weights" in notes[1]
