"""How many cached views does a student need, and does multi-resolution training cost fidelity?

The same tiny student (timm `test_vit`, seed 0, fixed steps) is distilled from stores of the tiny
teachers with V = 1, 2, 4 cached views per image (view 0 the centred square, the others random
resized crops), at one side and at two sides drawn per step (`--resolution-policy random`). Reported
per run: held-out fidelity per teacher (mean cosine of the student's adaptor outputs to the cached
targets; spatial maps resized to the teacher grid) on held-out images of another seed, at view 0
and at fresh random crops (views 1..3 of a held-out store built with another cache seed), at each
student side; the build time of the store (one teacher pass per view, once) and the training time
per epoch.

Not measured here: the online baseline (teachers in the loop on a fresh crop every step, issue 12),
and real teachers: the tiny preset has seeded random weights, so these are the numbers of a toy
problem, run on the CPU in minutes.

    python bench/fidelity.py --json fidelity.json   # 160 + 40 generated images, 300 steps per run
    python bench/fidelity.py --quick                # smoke: a handful of images and steps
"""

from __future__ import annotations

import csv
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common
from radio_distill.cache.build import CacheConfig, build_cache
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import tiny_teachers
from radio_distill.ops import normalise
from radio_distill.student import load_student
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train
from radio_distill.train.reader import CacheReader, decode_targets
from radio_distill.train.step import to_grid

FULL = dict(images=160, held_out=40, size=96, views="1,2,4", steps=300, batch_size=16, sides="64,96")
QUICK = dict(images=16, held_out=8, size=64, views="1,2", steps=4, batch_size=4, sides="32,48")
HELD_VIEWS = 4  # view 0 + 3 fresh random crops of each held-out image


def build(data, out, *, views: int, seed: int) -> float:
    """Seconds to build (or 0 when already built) a tiny-teacher store of `data` with `views` views."""
    if (out / "zarr.json").is_file():
        return 0.0
    start = time.perf_counter()
    build_cache(CacheConfig(data=data, out=out, teachers=tuple(tiny_teachers()), views=views, seed=seed,
                            shard_size=16, workers=2), progress=False)
    return time.perf_counter() - start


@torch.inference_mode()
def fidelity(model, reader: CacheReader, *, side: int, views: range, batch: int = 32) -> dict[str, float]:
    """{'<teacher>/<summary|spatial>': mean cosine} of `model` at `side` over `views` of every sample."""
    items = [(int(i), v) for v in views for i in reader.indices(holdout=0.0)]
    loader = DataLoader(reader.dataset(resolution=side), batch_sampler=[items[s:s + batch]
                                                                          for s in range(0, len(items), batch)])
    sums: dict[str, list[float]] = {}
    for part in loader:
        targets = decode_targets(part, reader.teachers, torch.device("cpu"))
        out = model(normalise(part["pixels"], model.mean, model.std)).teachers
        for t in reader.teachers:
            if targets[t.name]["summary"] is not None:
                cos = F.cosine_similarity(out[t.name].summary.float(), targets[t.name]["summary"], dim=-1)
                sums.setdefault(f"{t.name}/summary", []).extend(cos.tolist())
            cos = F.cosine_similarity(to_grid(out[t.name].spatial, t.grid), targets[t.name]["spatial"].flatten(1, 2),
                                      dim=-1).mean(1)  # (B,) mean over the teacher grid's tokens
            sums.setdefault(f"{t.name}/spatial", []).extend(cos.tolist())
    return {k: float(np.mean(v)) for k, v in sums.items()}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="training images")
    p.add_argument("--held-out", type=int, help="held-out images (another seed)")
    p.add_argument("--size", type=int, help="side of the generated images")
    p.add_argument("--views", help="cached views per image to compare, e.g. 1,2,4")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sides", help="student sides: the first alone, then all of them (random per step)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device("cpu")  # toy sizes: the CPU is the honest place for them
    views, sides = [int(v) for v in args.views.split(",")], tuple(int(s) for s in args.sides.split(","))
    work = args.work / f"fidelity-{args.images}-{args.size}"
    train_data = make_sample_dataset(work / "train", images=args.images, size=args.size, seed=0)
    held_data = make_sample_dataset(work / "held", images=args.held_out, size=args.size, seed=1)
    build(held_data, work / "held.zarr", views=HELD_VIEWS, seed=1)
    held = CacheReader(work / "held.zarr")
    base = TrainConfig(store=work, out=work, student="test_vit", steps=args.steps, batch_size=args.batch_size,
                       resolution=sides[0], lr=2e-3, holdout=0.0, workers=0, log_every=args.steps,
                       checkpoint_every=args.steps, device="cpu", seed=0)
    rows = []
    for v in views:
        store = work / f"train-v{v}.zarr"
        build_s = build(train_data, store, views=v, seed=0)
        for trained in ([sides[:1], sides] if len(sides) > 1 and v == max(views) else [sides[:1]]):
            run = work / f"run-v{v}-{'-'.join(map(str, trained))}"
            train(replace(base, store=store, out=run, resolution=trained), progress=False)
            with (run / "metrics.csv").open() as f:  # the loop's own rate: reads, decodes and steps, no setup
                epoch_s = args.images / float(list(csv.DictReader(f))[-1]["images_per_s"])
            model = load_student(run)
            for side in sides:
                for what, seen in (("view 0", range(1)), ("crops", range(1, HELD_VIEWS))):
                    fid = fidelity(model, held, side=side, views=seen)
                    rows.append({"views": v, "trained": ",".join(map(str, trained)), "side": side, "held": what,
                                 **fid, "mean": float(np.mean(list(fid.values()))), "build_s": build_s,
                                 "epoch_s": epoch_s})
    names = [k for k in rows[0] if "/" in k]
    columns = ([("views", "V", "d"), ("trained", "trained at", ""), ("side", "eval side", "d"), ("held", "held-out", "")]
               + [(k, k, ".4f") for k in names] + [("mean", "mean", ".4f"), ("build_s", "build s", ".1f"),
                                                   ("epoch_s", "train s/epoch", ".2f")])
    payload = common.meta(device, __file__, args.argv, images=args.images, held_out=args.held_out, size=args.size,
                          steps=args.steps, batch_size=args.batch_size, student="test_vit", teachers="tiny")
    return common.report(payload, rows, columns, args.json_out,
                         title="Held-out fidelity (mean cos) vs cached views and student sides — tiny teachers")


if __name__ == "__main__":
    main()
