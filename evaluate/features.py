"""The run under evaluation and one pass of its student over a split, next to the cached targets.

Every sample is seen through its view 0 (the canonical centred square) at the run's resolution.
Teacher features are the store's cached targets, less their fixed patterns when the run trained so
(`--denoise mean`); no teacher is ever loaded.

Letters: N samples, R student side, S*D backbone summary width, Dt / Ct a teacher's summary /
spatial width, h, w the student grid, ht, wt a teacher grid, M samples whose maps are kept,
Ms samples kept for the SAM metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import EvaluationError, RadioDistillError
from ..ops import autocast, normalise
from ..progress import Progress
from ..store.reader import CacheReader, decode_targets, worker_error
from ..train.step import to_grid

VIEW = 0


@dataclass(frozen=True)
class RunInfo:
    """What evaluation needs of a `radio-train` run folder (from RUN/run.json)."""

    path: Path
    student: str
    holdout: float
    sides: tuple[int, ...]  # the training resolutions (several for a multi-resolution run)
    allow_partial: bool
    store_settings: dict
    store: str | None = None  # the store it was trained from, where training found it
    denoise: str = "none"  # 'mean': it trained on targets less their teacher's fixed pattern, and is measured so

    @property
    def resolution(self) -> int:
        """The side evaluation runs at by default: the run's, the largest of several."""
        return max(self.sides)


def load_run(run: str | Path) -> RunInfo:
    path = Path(run)
    meta = path / "run.json"
    if not meta.is_file():
        raise EvaluationError(f"'{path}' is not a radio-train run folder (no run.json); pass the --out of `radio-train`")
    if not (path / "student" / "config.json").is_file():
        raise EvaluationError(f"run '{path}' has no exported student (student/config.json); "
                              "finish it with `radio-train ... --resume`")
    data = json.loads(meta.read_text())
    cfg = data["config"]
    sides = [s for part in (cfg["resolution"] if isinstance(cfg["resolution"], list) else [cfg["resolution"]])
             for s in (part if isinstance(part, list) else [part])]  # a 'partition' part may be a set of sides
    return RunInfo(path, data["student"], float(cfg["holdout"]), tuple(int(s) for s in sides),
                   bool(cfg.get("allow_partial")), data["store_settings"], data.get("store"),
                   cfg.get("denoise", "none"))  # a run from before --denoise: none


def open_reader(store: str | Path, run: RunInfo, *, images: str | Path | None = None) -> CacheReader:
    """The store, checked to be the one the run was trained from, its targets decoded as the run trained on
    them (`--denoise`); `images` is the image folder when it moved since the build (default: the root
    recorded in the store)."""
    reader = CacheReader(store, allow_partial=run.allow_partial, images=images, denoise=run.denoise)
    if reader.settings != run.store_settings:
        raise EvaluationError(f"run '{run.path}' was trained from a store with other teachers or settings than "
                              f"'{reader.path}'; evaluate it with its own store")
    return reader


@dataclass
class SplitFeatures:
    """Per-sample features of a split, in the order of `indices`."""

    indices: np.ndarray  # (N,) store rows
    labels: np.ndarray  # (N,) int, -1 unlabelled
    backbone_summary: np.ndarray  # (N, S*D)
    adaptor_summary: dict = field(default_factory=dict)  # teacher -> (N, Dt)
    teacher_summary: dict = field(default_factory=dict)  # teacher -> (N, Dt), cached
    fidelity: dict = field(default_factory=dict)  # teacher -> {'summary': (N,) | None, 'spatial': (N,)} cosines
    kept: np.ndarray = None  # (M,) positions in `indices` whose maps are kept
    backbone_spatial: np.ndarray = None  # (M, h, w, D) float16
    teacher_spatial: dict = field(default_factory=dict)  # teacher -> (M, ht, wt, Ct) float16, cached
    student_spatial: dict = field(default_factory=dict)  # teacher -> (M, ht, wt, Ct) float16 adaptor maps at its grid
    shown: np.ndarray = None  # (P,) positions whose maps are kept for pictures
    shown_student: dict = field(default_factory=dict)  # teacher -> (P, ht, wt, Ct) adaptor maps at the teacher grid
    shown_teacher: dict = field(default_factory=dict)  # teacher -> (P, ht, wt, Ct) cached targets
    sam_rows: np.ndarray = None  # (Ms,) positions whose SAM teachers' maps are kept
    sam_student: dict = field(default_factory=dict)  # SAM teacher -> (Ms, Ct, h, w) float16 adaptor maps
    sam_target: dict = field(default_factory=dict)  # SAM teacher -> (Ms, ht, wt, Ct) float16 cached targets


def collect(reader: CacheReader, model, indices: np.ndarray, *, resolution: int, device: torch.device,
            batch_size: int = 64, workers: int = 0, keep: np.ndarray | None = None, show: np.ndarray | None = None,
            sam_rows: np.ndarray | None = None, sam_teachers: tuple[str, ...] = (), progress: bool = True,
            what: str = "features") -> SplitFeatures:
    """Run the student over `indices` (view 0) and gather its outputs with the cached targets.

    Args:
        reader: the store.
        model: a loaded student in eval mode on `device`.
        indices: (N,) store rows.
        resolution: student input side R.
        keep: positions in `indices` whose spatial maps (backbone, adaptors at each teacher grid, cached
            teacher) are kept.
        show: positions whose adaptor and cached spatial maps are kept (pictures).
        sam_rows: positions whose adaptor maps at the student grid and cached targets of `sam_teachers`
            are kept (the SAM metric decodes both).
        workers: spawned DataLoader processes (0 = in this process).
    """
    keep = np.asarray([] if keep is None else keep, dtype=np.int64)
    show = np.asarray([] if show is None else show, dtype=np.int64)
    sam_rows = np.asarray([] if sam_rows is None else sam_rows, dtype=np.int64)
    keep_set, show_set, sam_set = set(keep.tolist()), set(show.tolist()), set(sam_rows.tolist())
    batches = [[(int(i), VIEW) for i in indices[s:s + batch_size]] for s in range(0, len(indices), batch_size)]
    loader = DataLoader(reader.dataset(resolution=resolution), batch_sampler=batches, num_workers=workers,
                        multiprocessing_context="spawn" if workers else None)
    names = [t.name for t in reader.teachers]
    acc = {"backbone_summary": [], "backbone_spatial": [], "summary": {n: [] for n in names},
           "target_summary": {n: [] for n in names}, "fid_summary": {n: [] for n in names},
           "fid_spatial": {n: [] for n in names}, "target_spatial": {n: [] for n in names},
           "student_spatial": {n: [] for n in names},
           "shown_student": {n: [] for n in names}, "shown_teacher": {n: [] for n in names},
           "sam_student": {n: [] for n in sam_teachers}, "sam_target": {n: [] for n in sam_teachers}}
    position = 0
    with Progress(what, total=len(batches), unit="batches", enabled=progress) as bar, torch.inference_mode():
        for batch in _batches(loader):
            B = len(batch["pixels"])
            rows = np.arange(position, position + B)
            kept = np.array([r in keep_set for r in rows])
            shown = np.array([r in show_set for r in rows])
            sam = np.array([r in sam_set for r in rows])
            position += B
            pixels = normalise(batch["pixels"].to(device), model.mean, model.std)
            targets = decode_targets(batch, reader.teachers, device)
            with autocast(device):
                out = model(pixels)
            acc["backbone_summary"].append(out.backbone.summary.float().cpu().numpy())
            if kept.any():
                acc["backbone_spatial"].append(out.backbone.spatial[kept].float().permute(0, 2, 3, 1).cpu().half().numpy())
            for t in reader.teachers:
                pred, target = out.teachers[t.name], targets[t.name]
                if target["summary"] is not None:
                    acc["summary"][t.name].append(pred.summary.float().cpu().numpy())
                    acc["target_summary"][t.name].append(target["summary"].cpu().numpy())
                    acc["fid_summary"][t.name].append(F.cosine_similarity(pred.summary.float(), target["summary"], dim=-1)
                                                      .cpu().numpy())
                grid = to_grid(pred.spatial.float(), t.grid)  # (B, ht * wt, Ct), resized as in training
                goal = target["spatial"].flatten(1, 2)  # (B, ht * wt, Ct)
                acc["fid_spatial"][t.name].append(F.cosine_similarity(grid, goal, dim=-1).mean(1).cpu().numpy())
                if kept.any():
                    acc["target_spatial"][t.name].append(target["spatial"][kept].cpu().half().numpy())
                    acc["student_spatial"][t.name].append(grid[kept].reshape(-1, *t.grid, grid.shape[-1]).cpu()
                                                          .half().numpy())
                if shown.any():
                    acc["shown_student"][t.name].append(grid[shown].reshape(-1, *t.grid, grid.shape[-1]).cpu().numpy())
                    acc["shown_teacher"][t.name].append(target["spatial"][shown].cpu().numpy())
                if sam.any() and t.name in sam_teachers:
                    acc["sam_student"][t.name].append(pred.spatial[sam].float().cpu().half().numpy())
                    acc["sam_target"][t.name].append(target["spatial"][sam].cpu().half().numpy())
            bar.advance()

    def cat(parts):
        return np.concatenate(parts) if parts else None

    feats = SplitFeatures(indices=np.asarray(indices), labels=reader.labels[indices],
                          backbone_summary=cat(acc["backbone_summary"]), kept=np.sort(keep), shown=np.sort(show),
                          backbone_spatial=cat(acc["backbone_spatial"]), sam_rows=np.sort(sam_rows))
    for t in reader.teachers:
        n = t.name
        if acc["summary"][n]:
            feats.adaptor_summary[n] = cat(acc["summary"][n])
            feats.teacher_summary[n] = cat(acc["target_summary"][n])
        feats.fidelity[n] = {"summary": cat(acc["fid_summary"][n]), "spatial": cat(acc["fid_spatial"][n])}
        if acc["target_spatial"][n]:
            feats.teacher_spatial[n] = cat(acc["target_spatial"][n])
            feats.student_spatial[n] = cat(acc["student_spatial"][n])
        if acc["shown_student"][n]:
            feats.shown_student[n] = cat(acc["shown_student"][n])
            feats.shown_teacher[n] = cat(acc["shown_teacher"][n])
    for n in sam_teachers:
        feats.sam_student[n], feats.sam_target[n] = cat(acc["sam_student"][n]), cat(acc["sam_target"][n])
    return feats


def _batches(loader: DataLoader):
    """The loader's batches; an error a worker raised (a corrupt chunk, an image gone) comes out as its
    one line naming the array or image and the sample, not as the worker's traceback."""
    try:
        yield from loader
    except RadioDistillError as e:
        raise worker_error(e) from None


def view_image(reader: CacheReader, index: int, size: int) -> np.ndarray:
    """The view-0 crop of store row `index`, as the student saw it, at `size` px: (size, size, 3) uint8."""
    return reader.dataset(resolution=size).crop(index, VIEW)
