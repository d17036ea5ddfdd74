"""Train at student speed: the `radio-train` data path vs the same student's compute-only step.

From a store of the three teachers (CLIP-L/14@224, DINOv2-L/14@224, SAM-B@1024; the one
bench/build.py leaves in <work>/stores, else built here), one ViT-B/16@224 student, one batch size,
measured in the same run:
  1. compute: train/loop.py's step (bf16 forward, AM-RADIO losses at each teacher's grid, backward,
     clip, AdamW, per-step loss sync) on one batch whose pixels and targets are already on the device;
  2. data: `CacheReader.loader` (spawned workers: tensorstore reads of the encoded targets, JPEG
     decode + crop + resize of the view) + the loop's device copy and `decode_targets`, no step;
  3. train: both, as the loop runs them; time blocked on the loader (wait) vs the rest (compute);
  4. radio-train: `train(TrainConfig(...))` itself, img/s from its metrics.csv (first log interval,
     which holds worker start-up, left out) -- the check that 3 is faithful.
  5. per item, in this process: ms of the target reads and of the JPEG decode + crop + resize
     (one loader worker's work; x workers = the loader's ceiling on free cores).
The first `--warmup` batches of 2-4 are not timed (worker spawn, prefetch, kernel selection).

Target: training from the cache at the student's compute speed (train img/s ~ compute img/s,
wait fraction ~ 0).

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
from radio_distill.train.reader import CacheReader

FULL = dict(teachers="three", images=1000, student="vit_base_patch16_224", resolution=224, batch_size=128,
            steps=60, warmup=None, workers=max(1, (os.cpu_count() or 2) - 2), shard_size=256)
QUICK = dict(teachers="tiny", images=32, student="test_vit", resolution=64, batch_size=8, steps=8, warmup=4,
             workers=2, shard_size=16)


def item_costs(reader, indices, resolution: int, count: int) -> dict:
    """Milliseconds per item of a loader worker's two jobs, in this process: the tensorstore reads of a
    sample's encoded targets, and the JPEG decode + crop + resize of its view (ViewDataset.__getitem__)."""
    from radio_distill.cache.dataset import load_rgb
    from radio_distill.cache.views import crop_resize

    ds = reader.dataset(resolution=resolution)
    items = [int(i) for i in indices[:count]]
    ds[(items[0], 0)]  # opens the handles
    start = time.perf_counter()
    for i in items:
        for r in [h[i, 0].read() for h in ds._handles.values()]:
            r.result()
    read = time.perf_counter() - start
    start = time.perf_counter()
    for i in items:
        image, span, _ = load_rgb(ds.root_dir / ds.ids[i], min_side=resolution)
        crop_resize(image, ds.boxes[i, 0], resolution, span=span)
    decode = time.perf_counter() - start
    return {"read_ms": read / len(items) * 1e3, "decode_ms": decode / len(items) * 1e3,
            "per_worker_img_s": len(items) / (read + decode)}


def radio_train_img_s(store: Path, args, device: torch.device) -> float:
    """img/s that `train()` logs in metrics.csv, over every log interval but the first."""
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
    store = args.store or common.ensure_store(args.teachers, args.images, work=args.work, shard_size=args.shard_size)
    reader = CacheReader(store)
    indices = reader.indices(holdout=0.0)
    reader.check_images(indices)
    step = common.DistillStep(args.student, reader.teachers, device)
    sizes = dict(resolution=args.resolution, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                 device=device)

    # 1. compute only: one batch, already on the device
    batch = next(iter(reader.loader(indices, resolution=args.resolution, batch_size=args.batch_size, seed=0,
                                    start_step=0, steps=1, workers=0)))
    pixels, targets = common.to_device(batch, reader.teachers, device)
    compute = args.batch_size * args.steps / common.timed(lambda: step(pixels, targets), steps=args.steps,
                                                           device=device, warmup=min(args.warmup, 3))
    # 2. data path alone, 3. data path + step, 4. radio-train itself
    data = common.loader_steps(reader, indices, None, workers=args.workers, **sizes)
    trained = common.loader_steps(reader, indices, step, workers=args.workers, **sizes)
    loop = radio_train_img_s(store, args, device) if args.loop_check else None
    costs = item_costs(reader, indices, args.resolution, min(len(indices), 4 * args.batch_size))

    row = {"student": args.student, "resolution": args.resolution, "batch": args.batch_size, "workers": args.workers,
           "teachers": ", ".join(t.name for t in reader.teachers), "compute_img_s": compute,
           "data_img_s": data["images_per_s"], "train_img_s": trained["images_per_s"],
           "of_compute": trained["images_per_s"] / compute, "wait_fraction": trained["wait_fraction"],
           "wait_s": trained["wait_s"], "compute_s": trained["compute_s"], "wait_p50_ms": trained["wait_p50_ms"],
           "wait_max_ms": trained["wait_max_ms"], "radio_train_img_s": loop,
           "bottleneck": "data" if trained["wait_fraction"] > 0.1 else "compute",
           "item_read_ms": costs["read_ms"], "item_decode_ms": costs["decode_ms"],
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
               ("item_read_ms", "read ms/item", ".2f"), ("item_decode_ms", "jpeg ms/item", ".2f"),
               ("bottleneck", "bottleneck", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title=f"Training from the cache vs compute only ({row['teachers']} targets)")


if __name__ == "__main__":
    main()
