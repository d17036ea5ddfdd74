"""Build at teacher speed: `radio-cache build` img/s vs each teacher's raw forward img/s, same run.

Each run builds a store (one view, default codecs: int8 spatial, fp16 summary) from generated
photos with `build_cache(CacheConfig(...))` through Ray, exactly as `radio-cache build` does, into
<work>/stores/<preset>-<n>.zarr (bench/train.py and bench/online.py reuse the `three` store).
Before any build (and before Ray starts), each teacher's raw forward is timed in this process at the same
batch size and precision (bf16 autocast + inference_mode on CUDA, fp32 on CPU) on photo pixels.

Reported per build: wall seconds (from the first shard sent to the last one back: actor start and
teacher loading excluded), images/s, seconds per 1k images (linearity across sizes), and `ideal`
= 1 / sum(1 / raw forward img/s): what the build would reach if the device only ran the teachers,
back to back (decode, resize, encode and writes free or hidden). Per teacher: the build report's
forward views/s (its forward + encode seconds inside the build) against its raw forward img/s.
Each actor runs two shards at once (cache/build.py starts them with `max_concurrency=2`), so those per-teacher
seconds can overlap the other shard's work and then under-state the teacher's speed; `teacher s /
wall` shows how much (above 1 = overlapping). The overall img/s vs ideal is the figure to judge.

Per-stage CPU seconds per 1k images (process CPU time, all threads), measured in this process on
`--stage-images` photos with the build's own functions, since the build's actors report only their
forward + encode seconds: decode (`load_rgb` at the largest teacher side), resize (`crop_resize` to
each teacher's side), forward (each teacher on normalised pixels), quantise (`codecs.encode` of each
target with its default codec) and write (tensorstore writes of one shard's encoded arrays into the
built store, the same bytes again, as the worker writes them).

Target: per-teacher build speed close to its raw forward, build time linear in images (s/1k images
within 1.2x from the smallest to the largest build).

    python bench/build.py --json build.json          # dinov2 at 1k/4k/16k images, three teachers at 1k
    python bench/build.py --quick                    # CPU smoke: tiny teachers, 32/64/128 images
    python bench/build.py --device cpu --runs tiny:1000,4000,16000 --batch-size 32   # linearity on a CPU
"""

from __future__ import annotations

import time

import numpy as np
import torch

import common
from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig, Storage
from radio_distill.store.dataset import load_rgb
from radio_distill.store.group import open_array
from radio_distill.cache.teachers import build_teacher
from radio_distill.store.views import crop_resize, view_boxes
from radio_distill.ops import autocast, normalise

FULL = dict(runs=["dinov2:1000,4000,16000", "three:1000"], batch_size=64, shard_size=256, raw_steps=10,
            stage_images=256)
QUICK = dict(runs=["tiny-dinov2:32,64,128", "tiny:32"], batch_size=16, shard_size=16, raw_steps=3, stage_images=16)
STAGES = ("decode", "resize", "forward", "quantise", "write")


def raw_forward(spec, *, listing, batch: int, steps: int, device: torch.device) -> float:
    """img/s of one teacher's forward alone at `batch`, in this process."""
    teacher = build_teacher(spec, device=device)
    pixels = common.load_views(listing, min(batch, 16), teacher.resolution).to(device)
    x = normalise(pixels[torch.arange(batch) % len(pixels)], teacher.mean, teacher.std)

    def forward():
        with torch.inference_mode(), autocast(device):
            teacher(x)

    return batch * steps / common.timed(forward, steps=steps, device=device)


def stage_cpu(specs, *, listing, count: int, batch: int, store, shard_size: int, device: torch.device) -> dict:
    """CPU seconds per 1k images of each build stage (see the module docstring), in this process."""
    teachers = [build_teacher(s, device=device) for s in specs]
    folder, names = listing.parent, listing.read_text().split()[:count]
    cpu = dict.fromkeys(STAGES, 0.0)

    def timed(stage, fn, *a, **kw):
        start = time.process_time()
        out = fn(*a, **kw)
        cpu[stage] += time.process_time() - start
        return out

    side = max(t.resolution for t in teachers)
    decoded = [timed("decode", load_rgb, folder / n, min_side=side) for n in names]
    boxes = [view_boxes(*d.size, views=1, seed=0, sample_id=n)[0] for d, n in zip(decoded, names)]
    for t in teachers:
        pixels = np.stack([timed("resize", crop_resize, d.image, b, t.resolution, span=d.span)
                           for d, b in zip(decoded, boxes)])
        storage = Storage()
        for start in range(0, count, batch):
            x = torch.from_numpy(pixels[start:start + batch]).to(device)

            def forward():
                with torch.inference_mode(), autocast(device):
                    out = t(normalise(x.permute(0, 3, 1, 2), t.mean, t.std))
                common.sync(device)
                return out

            summary, spatial = timed("forward", forward)
            for target, value in (("summary", summary), ("spatial", spatial)):
                if value is not None:
                    timed("quantise", codecs.encode, codecs.pool(value, storage.pool) if target == "spatial" else value,
                          getattr(storage, target))
    rows = slice(0, min(shard_size, count))  # one shard of the built store, written again as the worker does
    arrays = [p for s in specs for p in L.target_arrays(s.name) if (store / p / "zarr.json").is_file()]
    values = {p: open_array(store, p)[rows].read().result() for p in arrays}
    timed("write", lambda: [f.result() for f in [open_array(store, p)[rows].write(v) for p, v in values.items()]])
    cpu["write"] *= count / (rows.stop - rows.start)
    return {stage: seconds / count * 1000 for stage, seconds in cpu.items()}


def bench_run(preset: str, sizes: list[int], raw: dict, args, device: torch.device) -> list[dict]:
    """Build `preset` at each size; `raw` holds each teacher's raw forward img/s by spec."""
    specs = common.teacher_specs(preset)
    raw = {s.name: raw[s] for s in specs}
    ideal = 1 / sum(1 / r for r in raw.values())
    rows = []
    for n in sizes:
        cfg = CacheConfig(data=common.make_jpegs(n, work=args.work), out=common.store_path(args.work, preset, n),
                          teachers=tuple(specs), views=1, shard_size=args.shard_size, batch_size=args.batch_size,
                          workers=args.workers, overwrite=True)
        rep = build_cache(cfg, progress=False)
        assert rep["complete"], rep
        teachers, teacher_s = {}, 0.0
        for s in specs:
            t = rep["teachers"][s.name]
            seconds = rep["images_run"] / t["views_per_s"]
            teacher_s += seconds
            teachers[s.name] = {"label": common.label(s), "build_views_per_s": t["views_per_s"],
                                "raw_img_per_s": raw[s.name], "of_raw": t["views_per_s"] / raw[s.name],
                                "seconds": seconds, "bytes_per_view": t["bytes_per_view"]}
        rows.append({"run": preset, "images": rep["images_run"], "shards": rep["shards_run"],
                     "seconds": rep["seconds"], "s_per_1k": rep["seconds"] / rep["images_run"] * 1000,
                     "images_per_s": rep["images_per_s"], "ideal_images_per_s": ideal,
                     "of_ideal": rep["images_per_s"] / ideal, "teacher_s": teacher_s,
                     "teacher_s_per_wall": teacher_s / rep["seconds"],
                     "teachers": teachers,
                     "per_teacher": "  ".join(f"{k} {common.num(v['build_views_per_s'])}/{common.num(v['raw_img_per_s'])}"
                                              f" ({v['of_raw']:.0%})" for k, v in teachers.items())})
    stages = stage_cpu(specs, listing=common.make_jpegs(args.stage_images, work=args.work), count=args.stage_images,
                       batch=args.batch_size, store=common.store_path(args.work, preset, sizes[-1]),
                       shard_size=args.shard_size, device=device)
    for r in rows:
        r["stage_cpu_s_per_1k"] = stages
        r["stages"] = "  ".join(f"{k} {v:.1f}" for k, v in stages.items())
    first, last = rows[0], rows[-1]
    for r in rows:  # s/image relative to the smallest build: 1.0 = perfectly linear
        r["linearity"] = r["s_per_1k"] / first["s_per_1k"] if len(rows) > 1 else None
    if len(rows) > 1:  # marginal cost per 1k images between the smallest and largest build
        last["marginal_s_per_1k"] = (last["seconds"] - first["seconds"]) / (last["images"] - first["images"]) * 1000
    return rows


COLUMNS = [("run", "run", ""), ("images", "images", "d"), ("seconds", "wall s", ".1f"), ("s_per_1k", "s/1k img", "n"),
           ("linearity", "vs smallest", ".2f"), ("images_per_s", "build img/s", "n"),
           ("ideal_images_per_s", "ideal img/s", "n"), ("of_ideal", "of ideal", ".0%"),
           ("teacher_s_per_wall", "teacher s / wall", ".2f"),
           ("per_teacher", "per teacher: build/raw fwd img/s", ""),
           ("stages", "CPU s per 1k images by stage", "")]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--runs", nargs="+", help="PRESET:N[,N...] builds, e.g. dinov2:1000,4000,16000 three:1000")
    p.add_argument("--batch-size", type=int, help="teacher batch in the build and in the raw forward")
    p.add_argument("--shard-size", type=int)
    p.add_argument("--raw-steps", type=int, help="timed batches of each raw forward")
    p.add_argument("--workers", type=int, help="CPU-only runs: Ray workers (default 1; one per GPU on CUDA)")
    p.add_argument("--stage-images", type=int, help="photos the per-stage CPU times are measured on")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device(args.device)
    runs = [(r.split(":")[0], [int(n) for n in r.split(":")[1].split(",")]) for r in args.runs]
    listing = common.make_jpegs(max(n for _, sizes in runs for n in sizes), work=args.work)
    specs = dict.fromkeys(s for preset, _ in runs for s in common.teacher_specs(preset))
    raw = {}
    for s in specs:  # all before Ray starts: nothing else runs on the device or the cores
        raw[s] = raw_forward(s, listing=listing, batch=args.batch_size, steps=args.raw_steps, device=device)
        common.free(device)
    rows = [row for preset, sizes in runs for row in bench_run(preset, sizes, raw, args, device)]
    payload = common.meta(device, __file__, args.argv, batch_size=args.batch_size, shard_size=args.shard_size,
                          views=1, codecs="int8 spatial, fp16 summary", data=common.jpeg_stats(listing), random_init=True)
    return common.report(payload, rows, COLUMNS, args.json_out,
                         title="radio-cache build vs raw teacher forward (views=1; random-init teachers)")


if __name__ == "__main__":
    main()
