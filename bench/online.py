"""Why cache: training from the cache vs online distillation, same student, same batch.

  - online: every step runs the three teachers (CLIP-L/14@224, DINOv2-L/14@224, SAM-B@1024; our
    fast path, bf16 autocast + no_grad on CUDA) on the batch, then the student step of train/loop.py
    on their outputs. Generous to online: the batch's pixels are already on the device at 1024 px
    (no JPEG decode); each teacher and the student get a GPU antialiased resize of them.
  - cached: the same student step fed by `CacheReader.loader` + `decode_targets` from the store of
    those teachers (the one bench/build.py leaves in <work>/stores, else built here), data path included.
Reported: img/s of each, the speed-up, the online step's teacher/student time split, and the
time of one ImageNet-1k epoch (1,281,167 images) at each speed.

Target: cached >= 10x online per epoch on the GPU.

    python bench/online.py --json online.json      # ViT-B/16@224 student, batch 32
    python bench/online.py --quick                 # CPU smoke: tiny teachers and test_vit at 64 px
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from radio_distill.cache.teachers import build_teacher
from radio_distill.ops import autocast, normalise
from radio_distill.store.reader import CacheReader, TeacherMeta

FULL = dict(teachers="three", images=1000, student="vit_base_patch16_224", resolution=224, batch_size=32, steps=10,
            warmup=3, workers=max(1, (os.cpu_count() or 2) - 2), cache_steps=60, cache_warmup=None, shard_size=256)
QUICK = dict(teachers="tiny", images=32, student="test_vit", resolution=64, batch_size=4, steps=3, warmup=1,
             workers=2, cache_steps=8, cache_warmup=4, shard_size=16)
TARGET = 10.0


def resized(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """(B, 3, R, R) 0..255 -> (B, 3, side, side) float 0..255, antialiased bilinear on the device."""
    if pixels.shape[-1] == side:
        return pixels.float()
    return F.interpolate(pixels.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def online(args, device: torch.device) -> dict:
    """img/s of teachers + student step per batch, and the split between the two."""
    teachers = {s.name: build_teacher(s, device=device) for s in common.teacher_specs(args.teachers)}
    metas = []
    for name, t in teachers.items():
        info = t.info()
        metas.append(TeacherMeta(name, info.summary_dim, info.spatial_dim, info.grid, (), {}))
    step = common.student_step(args.student, metas, device)
    side = max([t.resolution for t in teachers.values()] + [args.resolution])
    listing = common.make_jpegs(args.images, work=args.work)
    pixels = common.load_views(listing, args.batch_size, side).to(device)  # (B, 3, R, R) uint8, on the device
    watch = common.Stopwatch(device)

    def one_step():
        with watch("teachers"):
            targets = {}
            for name, t in teachers.items():
                x = normalise(resized(pixels, t.resolution), t.mean, t.std)
                with torch.no_grad(), autocast(device):
                    summary, spatial = t(x)
                targets[name] = {"summary": summary, "spatial": spatial}
        with watch("student"):
            step.update(resized(pixels, args.resolution), targets)

    seconds = common.timed(one_step, steps=args.steps, device=device, warmup=args.warmup)
    split = {k: v / (args.warmup + args.steps) for k, v in watch.seconds.items()}  # per step, warm-up included
    share = split["teachers"] / (split["teachers"] + split["student"])
    return {"img_s": args.batch_size * args.steps / seconds, "teacher_share": share}


def cached(args, device: torch.device) -> dict:
    store = args.store or common.ensure_store(args.teachers, args.images, work=args.work, shard_size=args.shard_size)
    reader = CacheReader(store)
    indices = reader.indices(holdout=0.0)
    step = common.student_step(args.student, reader.teachers, device)
    warmup = args.cache_warmup if args.cache_warmup is not None else max(10, 2 * args.workers)
    run = common.loader_steps(reader, indices, step, resolution=args.resolution, batch_size=args.batch_size,
                              warmup=warmup, steps=args.cache_steps, workers=args.workers, device=device)
    del step
    common.free(device)
    return {**run, "store": str(store)}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--store", type=Path, help="an existing store of the same teachers (default: the bench store)")
    p.add_argument("--teachers", help="three (default) or tiny")
    p.add_argument("--images", type=int, help="images in the store")
    p.add_argument("--student")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed online steps")
    p.add_argument("--warmup", type=int, help="untimed online steps first")
    p.add_argument("--workers", type=int, help="loader workers of the cached path")
    p.add_argument("--cache-steps", type=int, help="timed steps from the cache")
    p.add_argument("--cache-warmup", type=int, help="untimed cached steps first (default: max(10, 2 x workers))")
    p.add_argument("--shard-size", type=int, help="when the store is built here")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device(args.device)
    from_cache = cached(args, device)
    common.free(device)
    live = online(args, device)
    speedup = from_cache["images_per_s"] / live["img_s"]
    row = {"student": args.student, "resolution": args.resolution, "batch": args.batch_size,
           "teachers": args.teachers, "online_img_s": live["img_s"], "online_teacher_share": live["teacher_share"],
           "cached_img_s": from_cache["images_per_s"], "cached_wait_fraction": from_cache["wait_fraction"],
           "speedup": speedup, "online_epoch_h": common.IMAGENET_TRAIN / live["img_s"] / 3600,
           "cached_epoch_h": common.IMAGENET_TRAIN / from_cache["images_per_s"] / 3600,
           "target": f">= {TARGET:g}x", "met": speedup >= TARGET}
    payload = common.meta(device, __file__, args.argv, store=from_cache["store"], workers=args.workers,
                          online_steps=args.steps, cache_steps=args.cache_steps, random_init=True)
    columns = [("student", "student", ""), ("batch", "batch", "d"), ("online_img_s", "online img/s", "n"),
               ("online_teacher_share", "teachers' share", ".0%"), ("cached_img_s", "cached img/s", "n"),
               ("speedup", "x faster", ".1f"), ("online_epoch_h", "online h/IN-1k epoch", ".2f"),
               ("cached_epoch_h", "cached h/IN-1k epoch", ".2f"), ("target", "target", ""), ("met", "met", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title="Online distillation vs training from the cache (same student, same batch)")


if __name__ == "__main__":
    main()
