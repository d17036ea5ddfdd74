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
Each actor runs two shards at once (cache/build.py, `max_concurrency=2`), so those per-teacher
seconds can overlap the other shard's work and then under-state the teacher's speed; `teacher s /
wall` shows how much (above 1 = overlapping). The overall img/s vs ideal is the figure to judge.

Target: per-teacher build speed close to its raw forward, build time linear in images.

    python bench/build.py --json build.json          # dinov2 at 1k/4k/16k images, three teachers at 1k
    python bench/build.py --quick                    # CPU smoke: tiny teachers, 32/64/128 images
"""

from __future__ import annotations

import torch

import common
from radio_distill.cache.build import CacheConfig, build_cache
from radio_distill.cache.teachers import build_teacher
from radio_distill.ops import autocast, normalise

FULL = dict(runs=["dinov2:1000,4000,16000", "three:1000"], batch_size=64, shard_size=256, raw_steps=10)
QUICK = dict(runs=["tiny-dinov2:32,64,128", "tiny:32"], batch_size=16, shard_size=16, raw_steps=3)


def raw_forward(spec, *, listing, batch: int, steps: int, device: torch.device) -> float:
    """img/s of one teacher's forward alone at `batch`, in this process."""
    teacher = build_teacher(spec, device=device)
    pixels = common.load_views(listing, min(batch, 16), teacher.resolution).to(device)
    x = normalise(pixels[torch.arange(batch) % len(pixels)], teacher.mean, teacher.std)

    def forward():
        with torch.inference_mode(), autocast(device):
            teacher(x)

    return batch * steps / common.timed(forward, steps=steps, device=device)


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
           ("per_teacher", "per teacher: build/raw fwd img/s", "")]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--runs", nargs="+", help="PRESET:N[,N...] builds, e.g. dinov2:1000,4000,16000 three:1000")
    p.add_argument("--batch-size", type=int, help="teacher batch in the build and in the raw forward")
    p.add_argument("--shard-size", type=int)
    p.add_argument("--raw-steps", type=int, help="timed batches of each raw forward")
    p.add_argument("--workers", type=int, help="CPU-only runs: Ray workers (default 1; one per GPU on CUDA)")
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
