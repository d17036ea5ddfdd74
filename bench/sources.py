"""Build input formats: `radio-cache build` from tar shards and from Parquet vs from image files, same run.

The same generated photos (bench/common.py) are given three ways: as files (a list file, one file per
image, read like a folder), as WebDataset tar shards (`<key>.jpg` + `<key>.cls`, --per-tar samples
each) and as Hugging Face style Parquet files (image struct {bytes, path} + label, --per-tar rows each
in row groups of --row-group). Per format, interleaved over --repeats rounds, the formats' order
rotated each round (the median of each figure is reported; every round is in the JSON):

- scan s: listing the dataset (`sources.scan_source`: a list file read, tar headers, Parquet footers
  and label columns), before any Ray worker starts;
- read img/s: one process, one thread, reading a shard's images as the build worker does
  (`Images.read`: a file each, one read per tar span, one read per Parquet row group), warm page cache;
- read+decode img/s: the same, and decoding each image at side 224 (`load_rgb`): the input path alone;
- build img/s: the whole build (`build_cache`, one view, tiny teachers, --workers Ray workers) from
  the build report, actor start excluded.

    python bench/sources.py --json sources.json      # 4k photos, tars of 500
    python bench/sources.py --quick                  # 256 photos, tars of 64
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import common
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.store.dataset import load_rgb
from radio_distill.store.sources import Images, scan_source

FULL = dict(images=4000, per_tar=500, row_group=100, shard_size=256, batch_size=32, workers=1, repeats=2)
QUICK = dict(images=256, per_tar=64, row_group=32, shard_size=64, batch_size=32, workers=1, repeats=1)
FIGURES = ("scan_s", "read_images_per_s", "read_decode_images_per_s", "build_seconds", "build_images_per_s")
SIDE = 224  # decode side of the read+decode measure: the tiny teachers' largest is smaller; real ones are 224+


def write_packed(listing: Path, *, per_tar: int, row_group: int) -> dict[str, str]:
    """Tar shards and Parquet files of the listed photos (written once); {format: build data argument}."""
    folder, names = listing.parent, listing.read_text().split()
    out = listing.parent.parent / f"packed-{len(names)}-{per_tar}-{row_group}"
    tars, parquets = out / "shards", out / "parquet"
    count = -(-len(names) // per_tar)
    if not (out / "done").is_file():
        tars.mkdir(parents=True, exist_ok=True)
        parquets.mkdir(parents=True, exist_ok=True)
        for t in range(count):
            chunk = names[t * per_tar:(t + 1) * per_tar]
            images = [(folder / n).read_bytes() for n in chunk]
            with tarfile.open(tars / f"{t:06d}.tar", "w") as tar:
                for n, data in zip(chunk, images):
                    key = n.rsplit(".", 1)[0]
                    for ext, value in (("jpg", data), ("cls", str(int(key) % 10).encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(value)
                        tar.addfile(info, io.BytesIO(value))
            table = pa.table({"image": [{"bytes": d, "path": n} for n, d in zip(chunk, images)],
                              "label": [int(n.rsplit(".", 1)[0]) % 10 for n in chunk]})
            pq.write_table(table, parquets / f"train-{t:05d}.parquet", row_group_size=row_group)
        (out / "done").write_text("")
    return {"files": str(listing), "tar": str(tars / f"{{000000..{count - 1:06d}}}.tar"),
            "parquet": str(parquets / "*.parquet")}


def read_images(data: str, *, shard_size: int, decode: bool) -> float:
    """img/s of reading every image as a build worker does (shard by shard), and decoding it, one thread."""
    manifest = scan_source(data)
    images = Images(manifest.source())
    start = time.perf_counter()
    for s in range(0, len(manifest), shard_size):
        rows = slice(s, s + shard_size)
        locations = None if manifest.locations is None else manifest.locations[rows]
        for payload in images.read(manifest.ids[rows], locations):
            if decode:
                load_rgb(payload, min_side=SIDE)
            elif isinstance(payload, Path):  # a file's bytes are read by the decoder: read them here
                payload.read_bytes()
    return len(manifest) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    for flag in ("images", "per-tar", "row-group", "shard-size", "batch-size", "workers", "repeats"):
        p.add_argument(f"--{flag}", type=int)
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device(args.device)
    listing = common.make_jpegs(args.images, work=args.work)
    inputs = write_packed(listing, per_tar=args.per_tar, row_group=args.row_group)
    specs = tuple(common.teacher_specs("tiny"))
    rounds = []
    for r in range(args.repeats):
        order = list(inputs)[r % len(inputs):] + list(inputs)[:r % len(inputs)]  # each format first once
        for fmt, data in ((f, inputs[f]) for f in order):
            started = time.perf_counter()
            scan_source(data)
            scan = time.perf_counter() - started
            read = read_images(data, shard_size=args.shard_size, decode=False)
            decode = read_images(data, shard_size=args.shard_size, decode=True)
            rep = build_cache(CacheConfig(data=Path(data), out=args.work / "stores" / f"sources-{fmt}.zarr",
                                          teachers=specs, views=1, shard_size=args.shard_size,
                                          batch_size=args.batch_size, workers=args.workers, overwrite=True),
                              progress=False)
            assert rep["complete"] and rep["ok"] == args.images, rep
            rounds.append({"format": fmt, "round": r, "images": rep["images_run"], "scan_s": scan,
                           "read_images_per_s": read, "read_decode_images_per_s": decode,
                           "build_seconds": rep["seconds"], "build_images_per_s": rep["images_per_s"]})
            print(json.dumps(rounds[-1]))
    rows = []
    for fmt in inputs:  # the median of each figure over the rounds
        mine = [r for r in rounds if r["format"] == fmt]
        rows.append({"format": fmt, "images": mine[0]["images"], "rounds": mine,
                     **{k: float(np.median([r[k] for r in mine])) for k in FIGURES}})
    for row in rows:
        for k in ("read_decode_images_per_s", "build_images_per_s"):
            row[k.replace("images_per_s", "vs_files")] = row[k] / rows[0][k]
    payload = common.meta(device, __file__, args.argv, teachers="tiny (toy size, random weights)",
                          photos=common.jpeg_stats(listing), per_tar=args.per_tar, row_group=args.row_group)
    columns = [("format", "input", ""), ("images", "images", "d"), ("scan_s", "scan s", ".2f"),
               ("read_images_per_s", "read img/s", "n"), ("read_decode_images_per_s", "read+decode img/s", "n"),
               ("read_decode_vs_files", "vs files", ".2f"), ("build_images_per_s", "build img/s", "n"),
               ("build_vs_files", "vs files", ".2f")]
    return common.report(payload, rows, columns, args.json_out,
                         title=f"Build input formats (median of {args.repeats} rounds): {args.images} photos, tars of {args.per_tar}, Parquet row "
                               f"groups of {args.row_group}, tiny teachers, {args.workers} Ray worker(s)")


if __name__ == "__main__":
    main()
