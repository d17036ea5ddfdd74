"""`radio-eval`: measure a trained student against its teachers on the run's held-out split.

One function, read top to bottom: run and store, splits, features, metrics, throughput, pictures,
report. Queries are always held-out samples (the split recorded by training); a bank or probe
training set, where a metric needs one, comes from the train split. Teachers are never loaded:
their features are the store's cached targets, their speed is measured on timm equivalents. The
one exception is SAM's prompt encoder and mask decoder (not its image encoder), for the SAM metric.

Letters: N samples, K classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import EvaluationError, RadioDistillError
from ..ops import check_device
from ..store import layout as L
from ..store.group import open_store, read_whole, weights_label
from ..store.location import check_folder
from ..store.sources import oriented_size
from ..student import load_student
from .config import EvalConfig
from .dense import load_masks, mask_grid, mask_path, probe_miou
from .features import SplitFeatures, collect, load_run, open_reader, view_image
from .metrics import IGNORE, knn_top1, zero_shot_top1
from .pictures import curves_png, features_png, read_metrics, resolution_png, sam_masks_png, sam_png
from .sam import (MIN_PIXELS, PromptSide, PromptSideOnly, find_sam_checkpoint, high_res_teachers, load_sam,
                  load_sam3, mask_agreement, object_points, point_masks, point_prompt_iou, sam_from_file, to_sam_grid)
from .throughput import measure_throughput

PICTURE_SIDE = 128
MAX_NATIVE_SIDE = 1024  # ground-truth masks are compared at the view's side in source pixels, at most this
SAM_POINTS = 4  # the SAM metric's prompts: a 4 x 4 grid of jittered single points per image


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Evaluate the student of `cfg.run`; writes report.json, report.md, features.png, curves.png to `cfg.out`.

    Returns:
        the report (as in report.json). Metrics that cannot run (no labels, no masks, no text
        embeddings) hold {'skipped': reason} instead of results.
    """
    # 1. the run, its store, and the device
    check_device(cfg.device)
    check_folder(cfg.out, "--out")
    run = load_run(cfg.run)
    reader = open_reader(cfg.store, run, images=cfg.images)
    root = open_store(reader.path)
    attrs = {t.name: dict(root[L.teacher_group(t.name)].attrs) for t in reader.teachers}
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_student(run.path / "student", device=device)
    resolution = cfg.resolution or run.resolution
    # fidelity per side: the sides asked for, else a multi-resolution run's own
    sweep = sorted(set(cfg.resolutions or (run.sides if len(run.sides) > 1 else ())))
    for option, sides in (("--resolution", [resolution]), ("--resolutions", sweep)):
        bad = [r for r in sides if r % model.input_stride]
        if bad:
            raise EvaluationError(f"{option} {','.join(map(str, bad))} is not a multiple of {model.input_stride}, "
                                  f"the input stride of '{run.student}'")
    sams, sam_notes = (sam_decoders(cfg, run, device, weight_files=root.attrs.get("weight_files")) if cfg.sam
                       else ({}, ["turned off (--no-sam)"]))

    # 2. splits: queries = held-out; bank and probe training images = a seeded subset of the train split
    held = reader.indices(holdout=run.holdout, split="holdout")
    train = reader.indices(holdout=run.holdout, split="train")
    if not len(held):
        raise EvaluationError(f"the held-out split of run '{run.path}' is empty: --holdout {run.holdout} of the "
                              f"{len(train)} usable samples of '{reader.path}' holds out none (the split is by a hash "
                              "of each sample id); train again with a larger --holdout, or on more images")
    rng = np.random.default_rng(cfg.seed)
    bank = np.sort(rng.choice(train, cfg.max_bank, replace=False)) if len(train) > cfg.max_bank else train
    labelled = len(reader.classes) >= 2 and (reader.labels[bank] >= 0).any() and (reader.labels[held] >= 0).any()
    masks, masks_note = _masks_dir(cfg, reader)
    instances, instances_note = _instances_dir(cfg, reader) if sams else (None, "")
    probe_train = _probe_rows(reader, bank, masks, cfg.probe_images, rng)
    probe_test = _probe_rows(reader, held, masks, cfg.probe_images, rng)
    need_bank = labelled or (len(probe_train) and len(probe_test))
    for side in {resolution, *sweep}:
        reader.check_images(held, resolution=side)
    if need_bank:
        reader.check_images(bank, resolution=resolution)
    shown = np.unique(np.linspace(0, len(held) - 1, min(cfg.pictures, len(held))).round().astype(int))
    sam_rows = np.sort(rng.permutation(len(held))[:cfg.sam_images]) if sams else None
    reader.check_images(held[shown], resolution=PICTURE_SIDE)  # pictures are decoded from the images

    # 3. features: one student pass per split, next to the cached targets
    kw = dict(resolution=resolution, device=device, batch_size=cfg.batch_size, workers=cfg.workers, progress=progress)
    sam_maps = tuple(dict.fromkeys(n for t, sam in sams.items() for n in (t, *(getattr(sam, "levels", None) or ()))))
    test = collect(reader, model, held, keep=probe_test, show=shown, sam_rows=sam_rows, sam_teachers=sam_maps,
                   what="held-out", **kw)
    fit = collect(reader, model, bank, keep=probe_train, what="train bank", **kw) if need_bank else None
    # the student at each of --resolutions on the same views (mode switching shows as a number)
    by_side = {side: test if side == resolution else
               collect(reader, model, held, what=f"held-out @{side}", **{**kw, "resolution": side}) for side in sweep}

    # 4. metrics
    labels = {t: _teacher_label(t, a["identity"]) for t, a in attrs.items()}
    report = {"store": str(reader.path), "run": str(run.path), "student": run.student, "resolution": resolution,
              "device": str(device), "teachers": labels, "denoise": run.denoise,
              "split": {"holdout": run.holdout, "view": 0, "held_out": int(len(held)), "train": int(len(train)),
                        "bank": int(len(bank))}}
    report["fidelity"] = fidelity_scores(test, reader)
    if sweep:
        report["fidelity_by_resolution"] = _fidelity_by_resolution(by_side, reader, trained=run.sides)
    report["knn"] = knn_scores(test, fit, cfg) if labelled else {"skipped": f"store '{reader.path}' is unlabelled "
                                                           "(fewer than 2 classes, or no labelled train/held-out samples)"}
    report["zero_shot"] = zero_shot_scores(root, reader, test) if labelled else {"skipped": "store is unlabelled"}
    if masks is None:
        report["dense"] = {"skipped": masks_note}
    elif not (len(probe_train) and len(probe_test)):
        report["dense"] = {"skipped": f"no masks under '{masks}' for {'train' if not len(probe_train) else 'held-out'} "
                                      "samples (mask of a/b.jpg = MASKS/a/b.png)"}
    else:
        report["dense"] = _dense(reader, masks, bank, held, fit, test, cfg, device)
    objects, objects_note = ({}, "") if not sams else _sam_objects(
        reader, instances, instances_note, held[test.sam_rows],
        {int(sam.prompt_encoder.input_image_size[0]) for sam in sams.values()})
    report["sam"], sam_ious = (sam_scores(test, sams, sam_notes, cfg, objects=objects, objects_note=objects_note)
                               if sams else ({"skipped": "; ".join(sam_notes)}, {}))

    # 5. throughput of the student and of each teacher's architecture on this device
    if cfg.throughput:
        report["throughput"] = measure_throughput(model, attrs, resolution=resolution, device=device,
                                                  batch=cfg.throughput_batch, progress=progress,
                                                  min_seconds=cfg.throughput_seconds)
    else:
        report["throughput"] = {"skipped": "turned off (--no-throughput)"}

    # 6. pictures and the report (a write that fails, e.g. on a full disk, is one line)
    out = Path(cfg.out)
    images = [view_image(reader, int(held[p]), PICTURE_SIDE) for p in test.shown]
    metrics_csv = run.path / "metrics.csv"
    rows = read_metrics(metrics_csv) if metrics_csv.is_file() else {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        features_png(out / "features.png", images, test.shown_teacher, test.shown_student,
                     note="teachers: " + ", ".join(labels.values()), captions=[reader.ids[held[p]] for p in test.shown])
        report["pictures"] = {"features": "features.png"}
        if rows.get("step") is not None and len(rows["step"]):
            curves_png(out / "curves.png", rows)
            report["pictures"]["curves"] = "curves.png"
        else:
            report["pictures"]["curves"] = None
            report["pictures"]["skipped"] = f"no training metrics in '{metrics_csv}'"
        if sam_ious:
            sam_png(out / "sam_iou.png", sam_ious)
            report["pictures"]["sam"] = "sam_iou.png"
        if objects:  # the student's masks next to the teacher's and the ground truth, with the prompts
            shown_sam, panels = sam_mask_panels(test, sams, objects, count=cfg.pictures, side=PICTURE_SIDE)
            if shown_sam:
                rows = held[test.sam_rows[shown_sam]]
                sam_masks_png(out / "sam_masks.png", [view_image(reader, int(r), PICTURE_SIDE) for r in rows], panels,
                              captions=[reader.ids[r] for r in rows], note="teachers: " + ", ".join(
                                  labels[t] for t in panels))
                report["pictures"]["sam_masks"] = "sam_masks.png"
        if sweep:
            resolution_png(out / "fidelity_resolution.png", report["fidelity_by_resolution"])
            report["pictures"]["resolutions"] = "fidelity_resolution.png"
        report = _plain(report)
        _write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
        _write_text(out / "report.md", render_markdown(report))
    except OSError as e:
        raise EvaluationError(f"cannot write the report to '{out}': {e.strerror or e}; free space and run `radio-eval` "
                              "again (the metrics are not kept)") from None
    return report


def _write_text(path: Path, text: str) -> None:
    """Written beside and renamed over `path`, so a failed write (a full disk) leaves no half report."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def _masks_dir(cfg: EvalConfig, reader) -> tuple[Path | None, str]:
    return _beside_images(cfg.masks, "--masks", reader.root_dir.parent / "masks",
                          "PNG label maps mirroring the images")


def _instances_dir(cfg: EvalConfig, reader) -> tuple[Path | None, str]:
    return _beside_images(cfg.instances, "--instances", reader.root_dir.parent / "instances",
                          "PNG instance maps mirroring the images, object number + 1, 0 background", what="instance masks")


def _beside_images(given, option: str, default: Path, kind: str, *, what: str = "masks") -> tuple[Path | None, str]:
    """(the folder given with `option`, or `default` beside the images when it exists, else None; why not)."""
    if given is not None:
        if not Path(given).is_dir():
            raise EvaluationError(f"{option} '{given}' is not a folder")
        return Path(given), ""
    if default.is_dir():
        return default, ""
    return None, f"no {what}: '{default}' does not exist; pass {option} DIR ({kind})"


def _sam_objects(reader, instances: Path | None, note: str, rows: np.ndarray, sides: set[int]) -> tuple[dict, str]:
    """The ground truth of the SAM metric's held-out images (view 0), at each SAM input side S.

    Returns:
        {S: per row (instance ids at S (S, S), instance ids at the view's own side (n, n)) or None
        when the image has no instance mask}, or {} and why.
    """
    if instances is None:
        return {}, note
    paths = [mask_path(instances, reader.ids[r]) for r in rows]
    if not any(p.is_file() for p in paths):
        return {}, (f"no instance masks under '{instances}' for the {len(rows)} held-out images of the SAM metric "
                    "(instance mask of a/b.jpg = INSTANCES/a/b.png)")
    out = {S: [] for S in sides}
    sources = reader.images.read(reader.ids[rows], None if reader.locations is None else reader.locations[rows])
    for r, path, source in zip(rows, paths, sources):
        if not path.is_file():
            for S in sides:
                out[S].append(None)
            continue
        size = oriented_size(source)  # from the header: the box is in these pixels
        box = reader.boxes[r, 0]
        n = max(1, min(MAX_NATIVE_SIDE, int(round(float(box[2] - box[0])))))
        with Image.open(path) as mask:
            native = _compact(mask_grid(mask, box, (n, n), image_size=size))
            for S in sides:
                out[S].append((_compact(mask_grid(mask, box, (S, S), image_size=size)), native))
    return out, ""


def _compact(ids: np.ndarray) -> torch.Tensor:
    """Instance ids as uint8 where they fit (up to 200 images of 1024 x 1024 at two sides are kept), else int32."""
    return torch.from_numpy(ids.astype(np.uint8 if ids.max(initial=0) < 256 and ids.min(initial=0) >= 0 else np.int32))


def _probe_rows(reader, indices: np.ndarray, masks: Path | None, cap: int, rng) -> np.ndarray:
    """Positions in `indices` of samples with a mask file: a seeded subset of at most `cap`."""
    if masks is None or cap <= 0:
        return np.zeros(0, dtype=np.int64)
    rows = [p for p, i in enumerate(indices) if mask_path(masks, reader.ids[i]).is_file()]
    return np.sort(rng.permutation(np.asarray(rows, dtype=np.int64))[:cap])


def sam_decoders(cfg: EvalConfig, run, device, *, weight_files: dict | None = None) -> tuple[dict, list[str]]:
    """{SAM teacher: its `Sam` (prompt encoder + mask decoder used) on `device`} and why others are left out.

    A teacher's checkpoint is --sam-checkpoint, else its weight file where the build found it
    (`weight_files`, the store's record) or, for the toy preset, in `cache/toy/` — either only with
    the recorded sha256; the tiny preset needs none. Loaded before any pass, so a wrong
    --sam-checkpoint fails in seconds, not after the features."""
    teachers = {n: i for n, i in run.store_settings["teachers"].items() if i["family"] == "sam"}
    later = {n: i for n, i in run.store_settings["teachers"].items() if i["family"] in ("sam2", "sam3")}
    if not teachers and not later:
        return {}, ["the store has no SAM teacher"]
    sams, notes = {}, []
    for name in later:
        side, why = _later_sam_decoder(name, later, (weight_files or {}).get(name))
        if side is None:
            notes.append(why)
        else:
            sams[name] = side.to(device).eval()
    for name, ident in teachers.items():
        if ident.get("spatial", "neck") != "neck":
            notes.append(f"{name}: cached pre-neck; SAM's mask decoder needs the neck target (--sam-spatial neck)")
            continue
        if ident.get("preset") != "tiny" and cfg.sam_checkpoint is None:
            found, why = find_sam_checkpoint(ident, name, (weight_files or {}).get(name))  # sha256 checked there
            if found is None:
                notes.append(why)
                continue
            sam = sam_from_file(ident, found, name)
        else:
            sam = load_sam(ident, cfg.sam_checkpoint, name)
        # never run here (2.5 GB for SAM-H): only the prompt side is; its input side stays known
        sam.image_encoder = PromptSideOnly(sam.image_encoder.img_size)
        sams[name] = sam.to(device).eval()
    return sams, notes


def _later_sam_decoder(name: str, teachers: dict, recorded: str | None):
    """SAM 2 or SAM 3 teacher `name`'s decoder as a `PromptSide` (with the teachers of its s0, s1 levels where it
    reads them), else None and why. A SAM 2 checkpoint is the file the build read, found unchanged; a SAM 3
    model is its hub id or its folder, unchanged."""
    ident = teachers[name]
    family = ident["family"]
    if ident.get("spatial", "neck") != "neck":
        return None, (f"{name}: {'SAM 2' if family == 'sam2' else 'SAM 3'}'s {ident['spatial']} level, decoded with "
                      "its image-embedding teacher")
    if family == "sam3":
        try:
            model = load_sam3(ident, name)
        except RadioDistillError as e:
            return None, str(e)
    else:
        found, why = find_sam_checkpoint(ident, name, recorded, fix="the metric needs its checkpoint unchanged where "
                                         "the build read it (--sam-checkpoint is SAM's)")
        if found is None:
            return None, why
        model = sam_from_file(ident, found, name)
        if not model.use_high_res_features_in_sam:
            return PromptSide(model), ""
    levels, why = high_res_teachers({n: i for n, i in teachers.items() if i["family"] == family}, name)
    return (None, why) if levels is None else (PromptSide(model, levels), "")


def sam_embeddings(test: SplitFeatures, name: str, sam, rows=slice(None)) -> dict[str, torch.Tensor]:
    """{'teacher': cached maps, 'student': adaptor maps} of SAM teacher `name` at `rows`, resized to its
    decoder's grid: (Ms, C, g, g), or for a `PromptSide` reading s0, s1 the three levels packed (`PromptSide.pack`)."""
    g = tuple(sam.prompt_encoder.image_embedding_size)
    names = (name,) + (tuple(reversed(sam.levels)) if getattr(sam, "levels", None) else ())  # embedding, s1, s0
    grids = (g, (2 * g[0], 2 * g[1]), (4 * g[0], 4 * g[1]))
    out = {}
    for who in ("teacher", "student"):
        maps = [to_sam_grid(torch.from_numpy(test.sam_target[n][rows]).permute(0, 3, 1, 2) if who == "teacher"
                            else torch.from_numpy(test.sam_student[n][rows]), grid) for n, grid in zip(names, grids)]
        out[who] = sam.pack(*maps) if len(maps) > 1 else maps[0]
    return out


def _teacher_label(name: str, ident: dict) -> str:
    label = weights_label(ident)
    return f"{name} ({label})" if label else name


def fidelity_scores(test: SplitFeatures, reader) -> dict:
    out = {}
    for t in reader.teachers:
        fid = test.fidelity[t.name]
        out[t.name] = {"summary": None if fid["summary"] is None else float(fid["summary"].mean()),
                       "spatial": float(fid["spatial"].mean()), "grid": list(t.grid)}
    return {"samples": int(len(test.indices)), "teachers": out}


def _fidelity_by_resolution(by_side: dict[int, SplitFeatures], reader, *, trained: tuple[int, ...]) -> dict:
    """Fidelity per teacher at each student input side: lists aligned with 'resolutions'."""
    per_side = {side: fidelity_scores(feats, reader)["teachers"] for side, feats in by_side.items()}
    teachers = {t.name: {target: [per_side[side][t.name][target] for side in by_side] for target in ("summary", "spatial")}
                for t in reader.teachers}
    return {"resolutions": list(by_side), "trained": list(trained), "samples": int(len(next(iter(by_side.values())).indices)),
            "teachers": teachers}


def knn_scores(test: SplitFeatures, fit: SplitFeatures, cfg: EvalConfig) -> dict:
    q, b = test.labels >= 0, fit.labels >= 0
    K = int(max(test.labels.max(), fit.labels.max())) + 1

    def top1(bank, queries):
        return knn_top1(bank[b], fit.labels[b], queries[q], test.labels[q], k=cfg.knn_k,
                        temperature=cfg.knn_temperature, num_classes=K)

    teachers = {t: {"teacher": top1(fit.teacher_summary[t], test.teacher_summary[t]),
                    "student": top1(fit.adaptor_summary[t], test.adaptor_summary[t])} for t in test.teacher_summary}
    return {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "bank": int(b.sum()), "queries": int(q.sum()),
            "student_backbone": top1(fit.backbone_summary, test.backbone_summary), "teachers": teachers}


def zero_shot_scores(root, reader, test: SplitFeatures) -> dict:
    have = [t.name for t in reader.teachers if L.text_array(t.name) in root]
    if not have:
        clips = [n for n, ident in reader.settings["teachers"].items() if ident.get("family") == "clip"]
        if not clips:  # `radio-cache text` needs a CLIP teacher's text tower: it would fail too
            return {"skipped": "no CLIP teacher in the store, so no text embeddings to classify by"}
        return {"skipped": f"no CLIP text embeddings in the store; run `radio-cache text {reader.path}` first"}
    q = test.labels >= 0
    out, notes = {}, []
    for t in have:
        group = root[L.text_group(t)]
        emb = read_whole(reader.path, root, L.text_array(t))  # (K, D)
        if len(emb) != len(reader.classes):
            notes.append(f"{t}: {len(emb)} text classes, the store has {len(reader.classes)}; rerun `radio-cache text`")
            continue
        out[t] = {"teacher": zero_shot_top1(test.teacher_summary[t][q], emb, test.labels[q]),
                  "student": zero_shot_top1(test.adaptor_summary[t][q], emb, test.labels[q]),
                  "classes": len(emb), "templates": len(group.attrs.get("templates", []))}
    result = {"queries": int(q.sum()), "teachers": out}
    if notes:
        result["notes"] = notes
    if not out:
        result["skipped"] = "; ".join(notes)
    return result


def _dense(reader, masks: Path, bank, held, fit: SplitFeatures, test: SplitFeatures, cfg: EvalConfig, device) -> dict:
    student_grid = tuple(fit.backbone_spatial.shape[1:3])
    grids = {student_grid} | {tuple(t.grid) for t in reader.teachers}
    rows = {"train": bank[fit.kept], "test": held[test.kept]}
    grid_masks = {k: load_masks(masks, reader.images.read(reader.ids[r], None if reader.locations is None else
                                                          reader.locations[r]), reader.ids[r], reader.boxes[r, 0], grids)
                  for k, r in rows.items()}
    seen = np.concatenate([m.ravel() for split in grid_masks.values() for m in split.values()])
    K = int(max(len(reader.classes) + 1, seen[seen != IGNORE].max(initial=0) + 1))

    def score(train_feats, test_feats, grid):
        return probe_miou(train_feats, grid_masks["train"][grid], test_feats, grid_masks["test"][grid],
                          num_classes=K, steps=cfg.probe_steps, device=device, seed=cfg.seed)

    teachers = {t.name: {"teacher": score(fit.teacher_spatial[t.name], test.teacher_spatial[t.name], tuple(t.grid)),
                         "student": score(fit.student_spatial[t.name], test.student_spatial[t.name], tuple(t.grid)),
                         "grid": list(t.grid)} for t in reader.teachers}
    return {"masks": str(masks), "classes": K, "train_images": int(len(fit.kept)), "test_images": int(len(test.kept)),
            "steps": cfg.probe_steps,
            "student_backbone": {"miou": score(fit.backbone_spatial, test.backbone_spatial, student_grid),
                                 "grid": list(student_grid)},
            "teachers": teachers}


def sam_scores(test: SplitFeatures, sams: dict, notes: list[str], cfg: EvalConfig, *, objects: dict | None = None,
               objects_note: str = "") -> tuple[dict, dict]:
    """SAM's mask decoder on the student's SAM adaptor maps (resized to SAM's grid, as the drop-in does)
    and on the cached teacher features (resized from a pooled grid):

    - ground truth: one positive point per object (its deepest pixel), each embedding's mask against
      the instance mask (`point_prompt_iou`), teacher and student on the same prompts, where
      `objects` (from `_sam_objects`) has the held-out images' instance masks;
    - agreement: per-prompt IoU over a seeded grid of points, vs the cached features decoded once
      more (the teacher's own: 1.0 for a deterministic decoder).

    Returns:
        the report section and {teacher: (Ms * P,) student agreement IoUs} for the histogram.
    """
    out, ious = {}, {}
    for name, sam in sams.items():
        grid = tuple(sam.prompt_encoder.image_embedding_size)
        target = test.sam_target[name]  # (Ms, ht, wt, C)
        embeddings = sam_embeddings(test, name, sam)
        teacher, student = embeddings["teacher"], embeddings["student"]  # (Ms, C, g, g)
        maps = (objects or {}).get(int(sam.prompt_encoder.input_image_size[0]))
        truth = ground_truth_iou(sam, teacher, student, maps) if maps else {"skipped": objects_note}
        iou = mask_agreement(sam, teacher, {"student": student, "teacher": teacher.clone()}, points=SAM_POINTS,
                             seed=cfg.seed)
        ious[name] = iou["student"].flatten().numpy()
        out[name] = {"ground_truth": truth, "student": _distribution(ious[name]),
                     "teacher": _distribution(iou["teacher"].flatten().numpy()), "grid": list(grid),
                     "stored_grid": list(target.shape[1:3])}
    section = {"images": int(len(test.sam_rows)), "prompts_per_image": SAM_POINTS ** 2, "teachers": out}
    if notes:
        section["notes"] = notes
    return section, ious


@torch.no_grad()
def ground_truth_iou(sam, teacher: torch.Tensor, student: torch.Tensor, maps: list) -> dict:
    """Mean point-prompt mask IoU against the instance masks, over objects, of the teacher's and the
    student's embeddings (Ms, C, g, g) on the same prompts; `maps`: per image (instances at S, at its
    own side) or None. {'teacher', 'student', 'objects', 'images'}, or {'skipped'} without objects."""
    device = sam.prompt_encoder.get_dense_pe().device
    got = {"teacher": [], "student": []}
    images = 0
    for m, pair in enumerate(maps):
        if pair is None:
            continue
        at_s, native = pair
        prompts = object_points(at_s, native)
        if not len(prompts[0]):
            continue
        images += 1
        for who, emb in (("teacher", teacher), ("student", student)):
            got[who].append(point_prompt_iou(sam, emb[m].to(device), at_s, native, points=prompts))
    if not images:
        return {"skipped": f"no object of at least {MIN_PIXELS} pixels in the instance masks of the held-out images"}
    per = {who: torch.cat(v) for who, v in got.items()}
    return {"teacher": float(per["teacher"].mean()), "student": float(per["student"].mean()),
            "objects": int(len(per["teacher"])), "images": images}


@torch.no_grad()
def sam_mask_panels(test: SplitFeatures, sams: dict, objects: dict, *, count: int, side: int) -> tuple[list, dict]:
    """What `sam_masks_png` draws: up to `count` of the SAM metric's images with prompted objects
    (evenly spread), and per SAM teacher, per image, the ground truth, the prompt points and the masks
    of the teacher's and the student's embeddings, all at `side` px.

    Returns:
        (positions in `test.sam_rows`, {teacher: [per image {'truth' (side, side), 'points' (K, 2),
        'ids' (K,), 'teacher'|'student': (K, side, side) bool, 'iou': {'teacher'|'student': float}}]}).
    """
    sides = {name: int(sam.prompt_encoder.input_image_size[0]) for name, sam in sams.items()}
    usable = [p for p in range(len(test.sam_rows))
              if all(objects[S][p] is not None and len(object_points(*objects[S][p])[0]) for S in sides.values())]
    if not usable:
        return [], {}
    shown = [usable[int(k)] for k in np.unique(np.linspace(0, len(usable) - 1, min(count, len(usable))).round())]
    panels = {}
    for name, sam in sams.items():
        device, S = sam.prompt_encoder.get_dense_pe().device, sides[name]
        embeddings = sam_embeddings(test, name, sam, shown)
        panels[name] = []
        for k, p in enumerate(shown):
            at_s, native = objects[S][p]
            ids, points = object_points(at_s, native)
            truth = F.interpolate(native[None, None].float(), size=(side, side), mode="nearest")[0, 0].long()
            cell = {"truth": truth.numpy(), "points": (points * side / S).numpy(), "ids": ids.numpy(), "iou": {}}
            for who, emb in embeddings.items():
                cell[who] = point_masks(sam, emb[k].to(device), points, (side, side)).cpu().numpy()
                cell["iou"][who] = float(point_prompt_iou(sam, emb[k].to(device), at_s, native,
                                                          points=(ids, points)).mean())
            panels[name].append(cell)
    return shown, panels


def _distribution(x: np.ndarray) -> dict:
    q = np.percentile(x, [0, 25, 50, 75, 100])
    return {"mean": float(x.mean()), **dict(zip(("min", "q1", "median", "q3", "max"), q.tolist()))}


def _plain(x):
    """numpy scalars -> Python; non-finite floats -> None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _f(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ratio(student, teacher) -> str:
    """student / teacher, the share of the teacher's score the student reaches."""
    return "—" if student is None or not teacher else f"{student / teacher:.2f}"


def render_markdown(r: dict) -> str:
    """report.json as Markdown tables: every task's student score next to its teacher's, and their ratio."""
    lines = [f"# radio-eval: {r['student']} vs its teachers", "",
             f"- store: `{r['store']}`", f"- run: `{r['run']}` (student input {r['resolution']} px, device {r['device']})",
             f"- split: {r['split']['held_out']} held-out samples (fraction {r['split']['holdout']}, view 0) as "
             f"queries; {r['split']['bank']} of {r['split']['train']} train samples as kNN bank"]
    if r.get("denoise") == "mean":
        lines.append("- teacher targets: the cached ones less each teacher's fixed pattern, as the run trained on them "
                     "(`--denoise mean`)")
    lines.append("")

    def skipped(section) -> bool:
        if "skipped" in section:
            lines.extend([f"_skipped: {section['skipped']}_", ""])
            return True
        return False

    lines += ["## Fidelity", "", "Mean cosine of the student's adaptor outputs to the cached teacher targets "
              "(spatial at the teacher grid).", "", "| teacher | summary | spatial | grid |", "|---|---|---|---|"]
    for t, v in r["fidelity"]["teachers"].items():
        lines.append(f"| {r['teachers'][t]} | {_f(v['summary'])} | {_f(v['spatial'])} | {'x'.join(map(str, v['grid']))} |")
    lines.append("")

    if "fidelity_by_resolution" in r:
        fr = r["fidelity_by_resolution"]
        sides = fr["resolutions"]
        lines += ["## Fidelity by resolution", "", f"The same {fr['samples']} held-out views at each student input side "
                  f"(trained at {', '.join(map(str, fr['trained']))} px); adaptor outputs resized to each teacher grid as usual.", "",
                  "| teacher | target | " + " | ".join(f"{s} px" for s in sides) + " |", "|---|---|" + "---|" * len(sides)]
        for t, v in fr["teachers"].items():
            lines += [f"| {r['teachers'][t]} | {target} | " + " | ".join(_f(x) for x in v[target]) + " |"
                      for target in ("summary", "spatial") if v[target][0] is not None]
        lines += ["", "![fidelity vs resolution](fidelity_resolution.png)", ""]

    k = r["knn"]
    lines += ["## kNN top-1", ""]
    if not skipped(k):
        lines += [f"k={k['k']}, cosine, votes exp(cos/{k['temperature']}); bank {k['bank']} train samples, "
                  f"{k['queries']} held-out queries.", "",
                  "| features | teacher (cached) | student (adaptor) | student/teacher |", "|---|---|---|---|"]
        lines += [f"| {r['teachers'][t]} summary | {_f(v['teacher'])} | {_f(v['student'])} | "
                  f"{_ratio(v['student'], v['teacher'])} |" for t, v in k["teachers"].items()]
        lines += [f"| student backbone summary | — | {_f(k['student_backbone'])} | — |", ""]

    z = r["zero_shot"]
    lines += ["## Zero-shot top-1", ""]
    if not skipped(z):
        lines += [f"Through the stored CLIP text embeddings; {z['queries']} held-out queries.", "",
                  "| teacher | classes x templates | teacher (cached) | student (adaptor) | student/teacher |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['teachers'][t]} | {v['classes']} x {v['templates']} | {_f(v['teacher'])} | {_f(v['student'])} "
                  f"| {_ratio(v['student'], v['teacher'])} |" for t, v in z["teachers"].items()]
        lines += [f"- {n}" for n in z.get("notes", [])] + [""]

    d = r["dense"]
    lines += ["## Dense probe mIoU", ""]
    if not skipped(d):
        lines += [f"Linear per-patch classifier ({d['steps']} full-batch AdamW steps) on {d['train_images']} train "
                  f"images, mIoU over {d['classes']} classes on {d['test_images']} held-out images, each at its "
                  f"features' own grid (the student's adaptor maps at their teacher's); masks from `{d['masks']}`.", "",
                  "| features | grid | teacher (cached) | student (adaptor) | student/teacher |", "|---|---|---|---|---|"]
        lines += [f"| {r['teachers'][t]} | {'x'.join(map(str, v['grid']))} | {_f(v['teacher'])} | "
                  f"{_f(v.get('student'))} | {_ratio(v.get('student'), v['teacher'])} |" for t, v in d["teachers"].items()]
        s = d["student_backbone"]
        lines += [f"| student backbone | {'x'.join(map(str, s['grid']))} | — | {_f(s['miou'])} | — |", ""]

    p = r["throughput"]
    lines += ["## Throughput", ""]
    if not skipped(p):
        lines += [f"Forward images/s on {p['device']} ({p['dtype']}, batch {p['batch']}); teachers as timm "
                  "architectures with random weights.", "", "| model | architecture | input | img/s |", "|---|---|---|---|",
                  f"| student {r['student']} | {r['student']} | {p['student']['resolution']} | "
                  f"{_f(p['student']['images_per_s'], 1)} |"]
        for t, v in p["teachers"].items():
            if "n/a" in v:
                lines.append(f"| {r['teachers'][t]} | n/a: {v['n/a']} | {v['resolution']} | n/a |")
                continue
            arch = v["architecture"] + (f" ({', '.join(f'{a}={b}' for a, b in v['overrides'].items())})"
                                        if v["overrides"] else "")
            lines.append(f"| {r['teachers'][t]} | {arch} | {v['resolution']} | {_f(v['images_per_s'], 1)} |")
        lines.append("")

    s = r["sam"]
    lines += ["## SAM mask IoU", ""]
    if not skipped(s):
        lines += ["The student as SAM's image encoder: SAM's prompt encoder and mask decoder on the student's SAM "
                  "adaptor output (resized to SAM's embedding grid unless drawn at it, `--upsample`, as "
                  "`sam_predictor` does) and on the cached "
                  "teacher features, held-out images (view 0).", "",
                  "Against ground truth: one positive point per object (its deepest pixel), the single-mask output "
                  "against the object's instance mask; mean IoU over objects, teacher and student on the same prompts.",
                  "", "| teacher | images | objects | teacher (cached) | student (adaptor) | student/teacher |",
                  "|---|---|---|---|---|---|"]
        for t, v in s["teachers"].items():
            g = v.get("ground_truth", {"skipped": "not measured"})
            if "skipped" in g:
                lines.append(f"| {r['teachers'][t]} | — | — | — | — | skipped: {g['skipped']} |")
            else:
                lines.append(f"| {r['teachers'][t]} | {g['images']} | {g['objects']} | {_f(g['teacher'])} | "
                             f"{_f(g['student'])} | {_ratio(g['student'], g['teacher'])} |")
        lines += ["", f"Agreement: {s['prompts_per_image']} seeded single-point prompts per image (a jittered grid) on "
                  f"{s['images']} images; IoU per prompt of the masks from each embedding vs those from the cached "
                  "features (the teacher row decodes them again: the reference).", "",
                  "| teacher | embeddings | grid | mean IoU | min | q1 | median | q3 | max |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t, v in s["teachers"].items():
            for who, label in (("teacher", "teacher (cached)"), ("student", "student (adaptor)")):
                d = v[who]
                lines.append(f"| {r['teachers'][t]} | {label} | {'x'.join(map(str, v['grid']))} | {_f(d['mean'])} | "
                             + " | ".join(_f(d[k], 3) for k in ("min", "q1", "median", "q3", "max")) + " |")
        lines += [f"- {n}" for n in s.get("notes", [])] + [""]
        if r["pictures"].get("sam_masks"):
            lines += ["![SAM point-prompt masks: ground truth, teacher, student](sam_masks.png)", ""]
        if r["pictures"].get("sam"):
            lines += ["![SAM mask IoU per prompt](sam_iou.png)", ""]

    lines += ["## Pictures", "", "![feature maps](features.png)", ""]
    if r["pictures"].get("curves"):
        lines += ["![training curves](curves.png)", ""]
    else:
        lines += [f"_curves skipped: {r['pictures'].get('skipped')}_", ""]
    return "\n".join(lines)
