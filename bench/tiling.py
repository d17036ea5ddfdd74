"""High-resolution targets by tiling (`@RxK`), judged by the dense probe at a high student side (issue 22, item 2).

Two stores of the same generated world scenes (larger than the teacher's side, so tiles see detail the
global view loses) with the trained toy DINOv2 (64 px, 8 x 8 tokens): one holds its global map only, one
also its 2 x 2-tiled map (`@64x2`: a 120 px canvas, 15 x 15 tokens). The same student (seed, steps,
order) trains at one high side from each: from the tiled store, training pairs that side with the tiled
map (`pair_teachers`); from the other, the student's map is shrunk to the 8 x 8 teacher grid in the loss.
`radio-eval` then fits the dense linear probe on each student's own tokens at that side (the same grid for
both), and on each teacher map at its grid. Cost: the build's seconds and bytes per view of each entry.

    python bench/tiling.py --json tiling.json     # 400 scenes of 288 x 256, 300 steps of the conv-stem ViT-tiny at 192 px
    python bench/tiling.py --quick                # smoke
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import torch

import common
from tasks import evaluated
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig, Storage
from radio_distill.cache.teachers import tiled_specs, toy_teachers
from radio_distill.cache.world import write_scenes
from radio_distill.store.inspect import store_info
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

FULL = dict(images=400, steps=300, batch_size=32, side=192)
QUICK = dict(images=24, steps=2, batch_size=8, side=192)
STUDENT = "vit_tiny_convstem_patch16_224"  # a plain ViT-tiny learns the shapes too slowly to compare anything (§13)
SCENE_SIZE = (288, 256)  # (W, H): above the 120 px canvas
SCENE_SEED = 6
HOLDOUT = 0.2


def build(images, out, tiles: int) -> float:
    """Seconds the build of the toy DINOv2 store took (kept beside it, so a rerun reports them)."""
    took = out.with_suffix(".seconds.json")
    if not (out / "zarr.json").is_file() or not took.is_file():
        dinov2 = replace(next(s for s in toy_teachers() if s.name == "dinov2"), tiles=tiles)
        specs = tiled_specs(dinov2)
        cfg = CacheConfig(data=images, out=out, teachers=tuple(specs), views=1, shard_size=64, workers=2,
                          batch_size=32, overwrite=True, storage={s.name: Storage() for s in specs})
        start = time.perf_counter()
        build_cache(cfg, progress=False)
        took.write_text(json.dumps(time.perf_counter() - start))
    return json.loads(took.read_text())


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="generated world scenes (a fifth held out by id hash)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--side", type=int, help="the student's side (above the canvas, 120, and the teacher's 64)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    torch.manual_seed(0)
    work = args.work / f"tiling-{args.images}"
    images = work / "world" / "images"
    if not images.is_dir():
        write_scenes(work / "world", images=args.images, seed=SCENE_SEED, size=SCENE_SIZE)
    base = TrainConfig(store=work, out=work, student=STUDENT, steps=args.steps, batch_size=args.batch_size,
                       resolution=args.side, lr=1e-3, holdout=HOLDOUT, workers=0, log_every=args.steps,
                       checkpoint_every=args.steps, device="cpu", seed=0)
    rows = []
    for label, tiles in (("global map only (shrunk student map)", 1), ("2x2-tiled map", 2)):
        store, run = work / f"tiles-{tiles}.zarr", work / f"tiles-{tiles}-run"
        build_s = build(images, store, tiles)
        if not (run / "student").is_dir():
            train(replace(base, store=store, out=run), progress=False)
        report = evaluated(store, run)
        info = store_info(store)
        trained = json.loads((run / "run.json").read_text())["pairing"][str(args.side)]
        dense = report["dense"]
        target = next(t for t in trained if t.startswith("dinov2"))
        rows.append({"targets": label, "trained on": target, "grid": "x".join(map(str, dense["teachers"][target]["grid"])),
                     "teacher_miou": dense["teachers"][target]["teacher"],
                     "student_head_miou": dense["teachers"][target]["student"],
                     "student_tokens_miou": dense["student_backbone"]["miou"], "build_s": build_s,
                     "bytes_per_view": sum(t["bytes_per_view"] for t in info["teachers"].values())})
    columns = [("targets", "targets", ""), ("trained on", "trained on", ""), ("grid", "its grid", ""),
               ("teacher_miou", "teacher map mIoU", ".3f"), ("student_head_miou", "student head mIoU", ".3f"),
               ("student_tokens_miou", f"student tokens mIoU @{args.side}", ".3f"), ("build_s", "build s", ".1f"),
               ("bytes_per_view", "bytes/view", ".0f")]
    payload = common.meta(torch.device("cpu"), __file__, args.argv, images=args.images, scene_size=SCENE_SIZE,
                          steps=args.steps, batch_size=args.batch_size, side=args.side, student=STUDENT)
    return common.report(payload, rows, columns, args.json_out,
                         title="Tiled vs global teacher maps: the dense probe at a high student side — toy DINOv2")


if __name__ == "__main__":
    main()
