"""Known answers: a student that outputs exactly the cached targets scores fidelity 1, the teachers'
own kNN accuracy and SAM mask IoU 1; one that outputs their negation scores fidelity -1."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from radio_distill.store import layout as L
from radio_distill.store.group import open_store
from radio_distill.evaluate import EvalConfig
from radio_distill.evaluate.features import collect, load_run
from radio_distill.evaluate.metrics import knn_top1
from radio_distill.evaluate.report import fidelity_scores, knn_scores, sam_scores, sam_decoders
from radio_distill.student import StudentOutput
from radio_distill.student.model import Features
from radio_distill.store.reader import CacheReader, decode_targets

from .conftest import HOLDOUT

RESOLUTION, BATCH = 32, 8


class Oracle(torch.nn.Module):
    """A 'student' that returns `sign` x the cached view-0 targets of `indices`, batch after batch in
    order (as `collect` asks for them), at the teacher grids; its backbone summary is CLIP's."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, reader: CacheReader, indices: np.ndarray, sign: float = 1.0):
        super().__init__()
        batches = [[(int(i), 0) for i in indices[s:s + BATCH]] for s in range(0, len(indices), BATCH)]
        loader = DataLoader(reader.dataset(resolution=RESOLUTION), batch_sampler=batches)
        self.outputs = [decode_targets(batch, reader.teachers, torch.device("cpu")) for batch in loader]
        self.sign = sign

    def forward(self, pixels: torch.Tensor) -> StudentOutput:
        targets = self.outputs.pop(0)
        assert len(pixels) == len(targets["clip"]["spatial"])
        teachers = {t: Features(None if v["summary"] is None else self.sign * v["summary"],
                                self.sign * v["spatial"].permute(0, 3, 1, 2))  # (B, C, h, w) at the teacher grid
                    for t, v in targets.items()}
        return StudentOutput(Features(teachers["clip"].summary, teachers["clip"].spatial), teachers)


def features(reader, indices, sign=1.0, **kw):
    return collect(reader, Oracle(reader, indices, sign), indices, resolution=RESOLUTION, device=torch.device("cpu"),
                   batch_size=BATCH, progress=False, **kw)


@pytest.fixture(scope="module")
def split(eval_setup):
    reader = CacheReader(eval_setup.store)
    return (reader, *(np.asarray(reader.indices(holdout=HOLDOUT, split=s)) for s in ("holdout", "train")))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fidelity_of_a_student_equal_to_its_teachers_is_one(split, sign):
    reader, held, _ = split
    fid = fidelity_scores(features(reader, held, sign), reader)
    assert fid["samples"] == len(held) > 0
    for t, v in fid["teachers"].items():
        assert v["spatial"] == pytest.approx(sign, abs=1e-6), t
        assert (v["summary"] is None) == (t == "sam")
        if v["summary"] is not None:
            assert v["summary"] == pytest.approx(sign, abs=1e-6), t


def test_knn_of_a_student_equal_to_its_teachers_is_the_teachers(eval_setup, split):
    reader, held, train = split
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=eval_setup.root / "unused", knn_k=5)
    knn = knn_scores(features(reader, held), features(reader, train), cfg)
    root = open_store(reader.path)
    labels = reader.labels[np.arange(reader.num_samples)]  # read independently of the evaluator
    bank, queries = train[labels[train] >= 0], held[labels[held] >= 0]  # labelled samples only
    for t in ("clip", "dinov2"):
        summary = root[L.target_array(t, "summary")][:, 0].astype(np.float32)  # (N, D) view 0, read independently
        expected = knn_top1(summary[bank], labels[bank], summary[queries], labels[queries], k=5, temperature=0.07,
                            num_classes=int(labels.max()) + 1)
        assert knn["teachers"][t] == {"teacher": pytest.approx(expected, abs=1e-9),
                                      "student": pytest.approx(expected, abs=1e-9)}
    assert knn["student_backbone"] == pytest.approx(knn["teachers"]["clip"]["teacher"], abs=1e-9)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sam_mask_iou_of_a_student_equal_to_its_teacher_is_one(eval_setup, split, sign):
    reader, held, _ = split
    cfg = EvalConfig(store=eval_setup.store, run=eval_setup.run, out=eval_setup.root / "unused")
    sams, notes = sam_decoders(cfg, load_run(eval_setup.run), torch.device("cpu"))
    assert list(sams) == ["sam"] and notes == []
    rows = np.arange(0, len(held), 2)
    feats = features(reader, held, sign, sam_rows=rows, sam_teachers=("sam",))
    section, ious = sam_scores(feats, sams, notes, cfg)
    assert section["images"] == len(rows) and ious["sam"].shape == (len(rows) * 16,)
    v = section["teachers"]["sam"]
    assert v["teacher"]["mean"] == 1.0
    if sign > 0:
        assert v["student"]["min"] == 1.0
    else:  # negated embeddings draw other masks
        assert v["student"]["mean"] < 0.9


def test_zero_shot_skip_says_what_the_store_lacks():
    """The hint to run `radio-cache text` only where it can work: a store with a CLIP teacher."""
    from types import SimpleNamespace

    from radio_distill.evaluate.report import zero_shot_scores

    reader = SimpleNamespace(teachers=[], path="s.zarr", settings={"teachers": {"dinov2": {"family": "dinov2"}}})
    assert zero_shot_scores({}, reader, None) == {"skipped": "no CLIP teacher in the store, so no text embeddings to "
                                                              "classify by"}
    reader.settings["teachers"]["clip"] = {"family": "clip"}
    assert zero_shot_scores({}, reader, None) == {"skipped": "no CLIP text embeddings in the store; run "
                                                              "`radio-cache text s.zarr` first"}
