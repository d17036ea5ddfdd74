"""Does `radio-train --denoise mean` keep a teacher's fixed pattern out of the student? A known pattern, injected.

The toy teachers (`--teachers toy`, spatial targets stored fp16) cache world scenes they never saw (seed 5).
A known fixed pattern P (h, w, C) is added to every stored spatial target of one teacher (DINOv2), as a ViT's
position-fixed artifacts would be (`known_pattern`: by default a few channel directions on smooth waves and
two high-norm tokens; `--pattern white`: Gaussian noise), less its mean over positions (so the targets'
global mean stays), scaled to `--strength` x the RMS of that teacher's tokens about their mean. Then:
  - `radio-cache pattern` runs on the clean store and on the injected one: found = the injected estimate
    minus the clean one (the teacher's own pattern: the scenes' layout, the grid's borders), projected on P,
    <found, P> / <P, P> (1: all of P), and the error |found - P| / |P|; and the pass's seconds;
  - the same student is trained on the injected store with `--denoise none`, `mean` and `shift` (the loss against
    another view's targets over the boxes' overlap: no pattern estimate used), then measured:
    carried = the per-position mean of its adaptor map for that teacher over the held-out views (view 0,
    the run's held-out split), minus its mean over positions, projected on P (1: the student learnt all of
    P, 0: none of it), with its cosine to P; and the task scores `radio-eval` reports (fidelity is to the
    targets each run trained on).

    python bench/pattern.py --json pattern.json   # 1000 scenes, 3 x 300 steps of ViT-tiny at 128 px
    python bench/pattern.py --quick               # smoke: tiny teachers, 48 scenes, 3 steps a run
    python bench/pattern.py --denoise shift       # one row (the store is reused when built)

Letters: h, w the teacher's stored grid, C its channels, B batch.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import zarr

import common
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.pattern import estimate_patterns
from radio_distill.cache.text import write_text_embeddings
from radio_distill.cache.world import write_scenes
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.ops import normalise
from radio_distill.store import layout as L
from radio_distill.store.group import open_store, shard_key
from radio_distill.store.location import location
from radio_distill.store.pattern import read_pattern
from radio_distill.store.provenance import values_digest
from radio_distill.store.reader import CacheReader
from radio_distill.student import load_student
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train
from radio_distill.train.step import to_grid

FULL = dict(images=1000, teachers="toy", student="vit_tiny_patch16_224", resolution=128, steps=300, batch_size=32,
            probe_steps=300, eval_workers=1)
QUICK = dict(images=48, teachers="tiny", student="test_vit", resolution=32, steps=3, batch_size=8, probe_steps=20,
             eval_workers=0)
HOLDOUT = 0.2


def inject(store: Path, teacher: str, pattern: np.ndarray) -> None:
    """Add `pattern` (h, w, C) to every stored spatial target of `teacher` (fp16, every sample readable), shard by
    shard, and record each rewritten file in the integrity record as its build would have (so the readers and
    `radio-cache verify` take the values as the teacher's). The norm statistics are left as they were."""
    root = zarr.open_group(store, mode="r+")
    array = root[L.target_array(teacher, "spatial")]
    n, size, record = root.attrs["num_samples"], root.attrs["shard_size"], root[L.SHARDS]
    j = record.attrs["arrays"].index(array.path)
    rows = record[...]
    for k in range(record.shape[0]):
        part = L.shard_rows(k, size, n)
        values = (array[part].astype(np.float32) + pattern).astype(np.float16)  # (S, V, h, w, C)
        array[part] = values
        key = shard_key(array.metadata, array.path, k, record.shape[0])
        rows[k, j] = (store / array.path / key).stat().st_size, values_digest(values)
    record[...] = rows


def known_pattern(offset: np.ndarray, var: np.ndarray, strength: float, kind: str = "artifacts",
                  seed: int = 0) -> np.ndarray:
    """(h, w, C) float32, less its mean over positions, at `strength` x the RMS of the teacher's tokens about their
    mean (from its clean `offset` and `var`). 'artifacts', shaped like a ViT's: 4 seeded orthonormal channel
    directions, each times one map over the grid, a wave of one period down it, one across it, and two single
    high-norm tokens at seeded positions, the four of equal energy; 'white': seeded Gaussian values at every
    position and channel."""
    rng = np.random.default_rng(seed)
    h, w, C = offset.shape
    if kind == "white":
        p = rng.standard_normal(offset.shape)
    else:
        y, x = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
        spots = np.zeros((2, h * w))
        spots[[0, 1], rng.choice(h * w, 2, replace=False)] = np.sqrt(h * w)
        maps = np.stack([np.sqrt(2) * np.cos(2 * np.pi * y), np.sqrt(2) * np.cos(2 * np.pi * x),
                         *spots.reshape(2, h, w)])  # (4, h, w), each of mean square 1
        p = np.einsum("khw,kc->hwc", maps, np.linalg.qr(rng.standard_normal((C, 4)))[0].T)
    p -= p.mean((0, 1))
    tokens = np.sqrt((offset.astype(np.float64) ** 2).sum(-1).mean() + var.astype(np.float64).sum(-1).mean())
    return (p * strength * tokens / np.sqrt((p ** 2).sum(-1).mean())).astype(np.float32)


def projection(found: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """How much of `p` a (h, w, C) map holds: <found, p> / <p, p>, their cosine, and |found - p| / |p|."""
    found, p = found.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    return {"share": float(found @ p / (p @ p)), "cos": float(found @ p / np.linalg.norm(found) / np.linalg.norm(p)),
            "error": float(np.linalg.norm(found - p) / np.linalg.norm(p))}


@torch.inference_mode()
def student_pattern(run: Path, reader: CacheReader, teacher: str, *, side: int, batch: int = 64) -> np.ndarray:
    """(h, w, C): the mean of the student's adaptor map for `teacher` (at the teacher's grid, as training compares
    it) over the run's held-out views 0, minus its mean over positions."""
    model = load_student(run / "student", device=torch.device("cpu"))
    meta = next(t for t in reader.teachers if t.name == teacher)
    held = np.asarray(reader.indices(holdout=HOLDOUT, split="holdout"))
    dataset = reader.dataset(resolution=side)
    total = torch.zeros(meta.grid[0] * meta.grid[1], meta.spatial_dim, dtype=torch.float64)
    for at in range(0, len(held), batch):
        items = [(int(i), 0) for i in held[at:at + batch]]
        pixels = torch.stack([x["pixels"] for x in dataset.__getitems__(items)])
        out = model(normalise(pixels, model.mean, model.std)).teachers[teacher]
        total += to_grid(out.spatial.float(), meta.grid).sum(0).double()  # (h * w, C)
    mean = (total / len(held)).reshape(*meta.grid, -1).numpy()
    return mean - mean.mean((0, 1))


def scores(report: dict, teacher: str) -> dict:
    """The task scores of `radio-eval`'s report: the student's, with the teacher's (on the targets it trained on)."""
    out = {}
    for key, section, name in (("knn", "knn", "dinov2"), ("zero_shot", "zero_shot", "clip"),
                               ("dense_dinov2", "dense", "dinov2"), ("dense_sam", "dense", "sam")):
        got = report[section].get("teachers", {}).get(name)
        out[key], out[f"{key}_teacher"] = (got["student"], got["teacher"]) if got else (None, None)
    truth = report["sam"].get("teachers", {}).get("sam", {}).get("ground_truth", {})
    out["sam_iou"], out["sam_iou_teacher"] = truth.get("student"), truth.get("teacher")
    fid = report["fidelity"]["teachers"][teacher]
    out["fidelity_spatial"], out["fidelity_summary"] = fid["spatial"], fid["summary"]
    return out


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="world scenes in the store (seed 5)")
    p.add_argument("--teachers", help="preset: toy (trained) or tiny (seeded random weights)")
    p.add_argument("--teacher", default="dinov2", help="the teacher whose targets get the pattern")
    p.add_argument("--strength", type=float, default=1.0, help="RMS of the pattern over the RMS of the tokens")
    p.add_argument("--pattern", choices=("artifacts", "white"), default="artifacts",
                   help="its shape: a few channel directions on smooth waves and high-norm tokens, or white noise")
    p.add_argument("--student")
    p.add_argument("--resolution", type=int, help="student input side")
    p.add_argument("--steps", type=int, help="optimizer steps of each run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--probe-steps", type=int, help="radio-eval --probe-steps")
    p.add_argument("--eval-workers", type=int, help="radio-eval --workers")
    p.add_argument("--denoise", default="none,mean,shift", help="the runs: --denoise settings, comma-separated")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device("cpu")  # toy sizes: the CPU is the honest place for them
    work = args.work / f"pattern-{args.teachers}-{args.images}"
    clean, injected = work / "clean.zarr", work / "injected.zarr"
    if not (clean / "zarr.json").is_file():
        images = write_scenes(work / "scenes", images=args.images, seed=5)
        build_cache(load_cache_config(data=images, out=clean, teachers=args.teachers, views=2, shard_size=64, workers=2,
                                      spatial_codec="fp16", overwrite=True), progress=False)
        write_text_embeddings(clean, device="cpu")
    seconds = {"clean": estimate_patterns(clean)["seconds"]}
    root = open_store(clean)
    offset, var = read_pattern(location(clean), root, args.teacher)
    known = known_pattern(offset, var, args.strength, args.pattern)
    shutil.rmtree(injected, ignore_errors=True)
    shutil.copytree(clean, injected)
    inject(injected, args.teacher, known)
    seconds["injected"] = estimate_patterns(injected)["seconds"]
    estimate = read_pattern(location(injected), open_store(injected), args.teacher)[0]
    found = projection(estimate - offset, known)

    base = TrainConfig(store=injected, out=work, student=args.student, steps=args.steps, batch_size=args.batch_size,
                       resolution=args.resolution, holdout=HOLDOUT, log_every=max(1, args.steps // 10),
                       checkpoint_every=args.steps, device="cpu")
    reader = CacheReader(injected)
    rows = []
    for denoise in args.denoise.split(","):
        run = work / f"run-{args.pattern}-{denoise}-{args.student}-{args.steps}"
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        train(replace(base, out=run, denoise=denoise), progress=False)
        train_s = time.perf_counter() - start
        carried = projection(student_pattern(run, reader, args.teacher, side=args.resolution), known)
        start = time.perf_counter()
        report = evaluate(EvalConfig(store=injected, run=run, out=run / "eval", throughput=False, device="cpu",
                                     workers=args.eval_workers, probe_steps=args.probe_steps), progress=False)
        rows.append({"denoise": denoise, "carried": carried["share"], "carried_cos": carried["cos"],
                     "train_s": train_s, "eval_s": time.perf_counter() - start, **scores(report, args.teacher)})
    columns = [("denoise", "--denoise", ""), ("carried", "P carried", ".3f"), ("carried_cos", "cos(S, P)", ".3f"),
               ("fidelity_spatial", f"{args.teacher} spatial fid", ".3f"), ("knn", "kNN", ".3f"),
               ("zero_shot", "zero-shot", ".3f"), ("dense_dinov2", "dinov2 mIoU", ".3f"),
               ("dense_sam", "sam mIoU", ".3f"), ("sam_iou", "SAM IoU", ".3f"), ("train_s", "train s", ".0f"),
               ("eval_s", "eval s", ".0f")]
    payload = common.meta(device, __file__, args.argv, images=args.images, teachers=args.teachers,
                          teacher=args.teacher, strength=args.strength, pattern=args.pattern, student=args.student,
                          resolution=args.resolution, steps=args.steps, batch_size=args.batch_size, holdout=HOLDOUT,
                          grid=list(known.shape[:2]), found=found, pattern_s=seconds)
    print(f"radio-cache pattern found {found['share']:.4f} of P (cos {found['cos']:.4f}, error {found['error']:.4f}); "
          f"pass {seconds['clean']:.1f} s clean, {seconds['injected']:.1f} s injected")
    return common.report(payload, rows, columns, args.json_out,
                         title=f"Fixed pattern P ({args.pattern}) injected into {args.teacher}'s targets (RMS "
                               f"{args.strength:g} x its tokens'): how much of it the student carries, "
                               f"--denoise {args.denoise.replace(',', ', ')}")


if __name__ == "__main__":
    main()
