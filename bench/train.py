"""Train at student speed: `radio-train` vs the same student's compute-only step and its data path alone.

From a store of the three teachers (CLIP-L/14@224, DINOv2-L/14@224, SAM-B@1024; the one
bench/build.py leaves in <work>/stores, else built here), one ViT-B/16@224 student, one batch size,
measured in the same run, every mode through radio-train's own step (`train.step.DistillStep`:
device copy, target decode, bf16 forward, losses at each teacher's grid, backward, clip, AdamW):
  1. compute: the step on one batch already on the device;
  2. data: `CacheReader.loader` (spawned workers: one tensorstore read per array per batch, JPEG
     decode + crop + resize of the views) + the device copy and `decode_targets`, no step;
  3. train: both, as the loop runs them; time blocked on the loader (wait) vs the rest (compute);
  4. radio-train: `train(TrainConfig(...))` itself, img/s from its metrics.csv over the log intervals
     after the first (which holds worker start-up and warm-up); `of_bound` compares it with
     1 / (1/compute + 1/data), the speed with no overlap of compute and data at all (target >= 0.8);
  5. per item, in this process: ms of a worker's batch read (targets + decode) and of the JPEG decode
     + crop + resize alone (x workers = the loader's ceiling on free cores).
The first `--warmup` batches are not timed (worker spawn, prefetch, kernel selection). On the CPU every
mode runs the step at the intra-op threads radio-train uses beside its loader workers (cores - workers).

Target: training from the cache at the student's compute speed (train img/s ~ compute img/s,
wait fraction ~ 0); on the CPU, where loader workers and the step share the cores, radio-train
>= 0.8 x the no-overlap bound.

    python bench/train.py --json train.json        # ViT-B/16@224, batch 128, 14 loader workers on a 16-core host
    python bench/train.py --quick                  # CPU smoke: tiny teachers and test_vit at 64 px
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

import torch

import common
from radio_distill.store.reader import CacheReader

FULL = dict(teachers="three", images=1000, student="vit_base_patch16_224", resolution=224, batch_size=128,
            steps=60, warmup=None, workers=max(1, (os.cpu_count() or 2) - 2), shard_size=256)
QUICK = dict(teachers="tiny", images=32, student="test_vit", resolution=64, batch_size=8, steps=50, warmup=10,
             workers=1, shard_size=16)


def item_costs(reader, indices, resolution: int, count: int, batch_size: int) -> dict:
    """Milliseconds per item of a loader worker's job, in this process: a batch read (`ViewDataset.__getitems__`:
    targets + view pixels), and the JPEG decode + crop + resize alone."""
    ds = reader.dataset(resolution=resolution)
    items = [(int(i), 0) for i in indices[:count]]
    ds.__getitems__(items[:1])  # opens the handles
    start = time.perf_counter()
    for b in range(0, len(items), batch_size):
        ds.__getitems__(items[b:b + batch_size])
    item = (time.perf_counter() - start) / len(items)
    start = time.perf_counter()
    for i, v in items:
        ds.crop(i, v)
    decode = (time.perf_counter() - start) / len(items)
    return {"item_ms": item * 1e3, "decode_ms": decode * 1e3, "per_worker_img_s": 1 / item}


def radio_train_img_s(store: Path, args, device: torch.device) -> float:
    """img/s that `train()` logs in metrics.csv, over every log interval but the first (start-up, warm-up)."""
    from radio_distill.train.config import TrainConfig
    from radio_distill.train.loop import train

    every = max(1, args.warmup)
    intervals = max(1, -(-args.steps // every))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(store=store, out=Path(out) / "run", student=args.student, steps=every * (intervals + 1),
                          batch_size=args.batch_size, resolution=args.resolution, workers=args.workers,
                          log_every=every, checkpoint_every=10**9, holdout=0.0, device=str(device))
        train(cfg, progress=False)
        with (Path(out) / "run" / "metrics.csv").open() as f:
            rates = [float(r["images_per_s"]) for r in csv.DictReader(f)][1:]
    return len(rates) / sum(1 / r for r in rates)  # equal images per interval: harmonic mean


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--store", type=Path, help="an existing store (default: the <teachers>-<images> bench store)")
    p.add_argument("--teachers", help="preset of the store to build or reuse: three (default) or tiny")
    p.add_argument("--images", type=int, help="images in the store")
    p.add_argument("--student")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps per mode")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: max(10, 2 x workers))")
    p.add_argument("--workers", type=int, help="loader worker processes (radio-train --workers)")
    p.add_argument("--shard-size", type=int, help="when the store is built here")
    p.add_argument("--no-loop-check", dest="loop_check", action="store_false",
                   help="skip timing radio-train's own loop")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    args.warmup = args.warmup if args.warmup is not None else max(10, 2 * args.workers)
    device = torch.device(args.device)
    if device.type == "cpu":  # every mode's step at the threads radio-train gives it beside its loader workers
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    store = args.store or common.ensure_store(args.teachers, args.images, work=args.work, shard_size=args.shard_size)
    reader = CacheReader(store)
    indices = reader.indices(holdout=0.0)
    reader.check_images(indices)
    sizes = dict(resolution=args.resolution, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                 device=device)

    # 1. compute only: one batch, already on the device
    batch = next(iter(reader.loader(indices, resolution=args.resolution, batch_size=args.batch_size, seed=0,
                                    start_step=0, steps=1, workers=0)))
    on_device = {k: v.to(device) for k, v in batch.items()}
    step = common.student_step(args.student, reader.teachers, device)
    compute = args.batch_size * args.steps / common.timed(lambda: step(on_device), steps=args.steps,
                                                           device=device, warmup=min(args.warmup, 3))
    # 2. data path alone, 3. data path + step, 4. radio-train itself
    data = common.loader_steps(reader, indices, None, workers=args.workers, **sizes)
    trained = common.loader_steps(reader, indices, common.student_step(args.student, reader.teachers, device),
                                  workers=args.workers, **sizes)
    loop = radio_train_img_s(store, args, device) if args.loop_check else None
    costs = item_costs(reader, indices, args.resolution, min(len(indices), 4 * args.batch_size), args.batch_size)

    bound = 1 / (1 / compute + 1 / data["images_per_s"])
    row = {"student": args.student, "resolution": args.resolution, "batch": args.batch_size, "workers": args.workers,
           "teachers": ", ".join(t.name for t in reader.teachers), "compute_img_s": compute,
           "data_img_s": data["images_per_s"], "train_img_s": trained["images_per_s"],
           "of_compute": trained["images_per_s"] / compute, "wait_fraction": trained["wait_fraction"],
           "wait_s": trained["wait_s"], "compute_s": trained["compute_s"], "wait_p50_ms": trained["wait_p50_ms"],
           "wait_max_ms": trained["wait_max_ms"], "radio_train_img_s": loop, "no_overlap_img_s": bound,
           "of_bound": loop / bound if loop else None,
           "bottleneck": "data" if trained["wait_fraction"] > 0.1 else "compute",
           "item_ms": costs["item_ms"], "item_decode_ms": costs["decode_ms"],
           "worker_img_s": costs["per_worker_img_s"]}
    target_bytes = sum(batch[p][0].numel() * batch[p].element_size() for t in reader.teachers for p in t.arrays)
    payload = common.meta(device, __file__, args.argv, store=str(store), images=len(indices), steps=args.steps,
                          warmup=args.warmup, target_bytes_per_sample=target_bytes,
                          data=common.jpeg_stats(common.make_jpegs(len(indices), work=args.work))
                          if args.store is None else None, random_init=True)
    columns = [("student", "student", ""), ("batch", "batch", "d"), ("workers", "workers", "d"),
               ("compute_img_s", "compute img/s", "n"), ("data_img_s", "data img/s", "n"),
               ("train_img_s", "train img/s", "n"), ("of_compute", "of compute", ".0%"),
               ("wait_fraction", "waiting", ".0%"), ("radio_train_img_s", "radio-train img/s", "n"),
               ("of_bound", "of no-overlap bound", ".0%"),
               ("item_ms", "worker ms/item", ".2f"), ("item_decode_ms", "jpeg ms/item", ".2f"),
               ("bottleneck", "bottleneck", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title=f"Training from the cache vs compute only ({row['teachers']} targets)")


if __name__ == "__main__":
    main()
