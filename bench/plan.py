"""Build planning from img2dataset's sidecars: `scan_source` of 100,000 tars without reading one, seconds.

DataComp and CC12M come as img2dataset writes them: per shard `NNNNN.tar` beside its `NNNNN.parquet`
(a row per URL) and `NNNNN_stats.json`. Planning from the sidecars (`store/sources.py`) reads only
the Parquet files' `key` and `status` columns and the stats, where listing the tars' headers would
stream the whole dataset (hundreds of TB for DataComp-1B) before the first teacher runs.

Each --shapes entry TARSxROWS generates once, under <work>/plan-<tars>-<rows>/, an img2dataset output
folder: per tar a Parquet sidecar with img2dataset's columns (caption, url, key, status,
error_message, width, height, original_width, original_height, exif, sha256) and ROWS URLs (1 in 10
`failed_to_download`, keys as img2dataset computes them), its stats JSON, and the tar itself as an
empty placeholder: planning only stats a tar (tests/cache/test_sidecars.py checks on real tars that
the plan equals listing them). It times `scan_source('<folder>/{00000..N}.tar')` (brace expansion, a
stat per tar and per sidecar, the sidecars read in SIDECAR_THREADS threads, the manifest; wall and
CPU seconds) and the manifest's fingerprint, and counts what the process read: `rchar` of
/proc/self/io (every read call's bytes, page cache included) against the bytes of the sidecars on
disk, and the tars opened (Python's `open`, `os.open`, `tarfile.open` wrapped: 0). The folders are
in the page cache after generation (a rerun's rate); a network file system adds its per-file
latency, which the threads overlap. The machine's load average is recorded: on a shared 2-core VM
other jobs' load moves the wall seconds.

Two regimes: 100,000 tars of 100 URLs, where the cost per tar dominates (opening a Parquet file:
~0.3 ms of CPU, mostly pyarrow's Python layers), and 100 tars of img2dataset's default 10,000 URLs,
where the cost per sample dominates (`us/sample`: reading the columns, the ids as Python strings).

Target: <= 60 s for 100,000 tars on the 2-core CPU.

Tars without sidecars (`--unlisted TARSxROWS`, issue 21): `scan_source(..., tar_samples=ROWS)` plans ROWS rows
per tar without listing one (each build worker lists its shard's tar, `sources.Images.unlisted`); the driver
reads each tar's first 512-byte header block only, to name a file that is no tar before anything is created.
Generated once under <work>/plan-unlisted-<tars>/: real tars (`tarfile`: 4 JPEG-sized members, 40 kB),
hard links of one tar (a copy every 60,000: ext4's link limit). Same counts as above; `tars opened` is
then TARS (one `os.open` and one 512-byte `pread` a tar), where listing their headers reads every member
header of every tar (with readahead, about every byte).

    python bench/plan.py --json plan.json     # 100,000 tars of 100 URLs (9M samples); 100 of 10,000 (900k)
    python bench/plan.py --quick               # 1000 tars of 100 URLs; 10 of 1000
    python bench/plan.py --shapes 20000x500    # any other folder
    python bench/plan.py --shapes --unlisted 100000x10000   # only tars without sidecars, 10,000 rows a tar

"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import common
from radio_distill.store.sources import SIDECAR_THREADS, scan_source

FULL = dict(shapes=["100000x100", "100x10000"], unlisted=["100000x10000"])
QUICK = dict(shapes=["1000x100", "10x1000"], unlisted=["1000x10000"])
LINKS = 60_000  # hard links of one file before a copy (ext4 allows 65,000)
TARGET_TARS = 100_000  # planned in <= 60 s
SCHEMA = pa.schema([("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
                    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
                    ("sha256", pa.string())])  # img2dataset's: the input columns, then what it adds


def make_folder(work: Path, tars: int, rows: int) -> Path:
    """Generate (once) img2dataset's output of `tars` shards of `rows` URLs: sidecars, stats, empty tars."""
    root = work / f"plan-{tars}-{rows}"
    done = root / "complete.txt"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    digits = math.ceil(math.log10(rows))
    failed = np.arange(rows) % 10 == 3  # rows 3, 13, ...
    ok = ~failed
    for shard in range(tars):
        name = f"{shard:05d}"
        keys = [f"{shard * 10 ** digits + i:0{digits + 5}d}" for i in range(rows)]
        table = pa.table({
            "caption": [f"a photo, caption {k}" for k in keys], "url": [f"https://example.com/i/{k}.jpg" for k in keys],
            "key": keys, "status": np.where(ok, "success", "failed_to_download").tolist(),
            "error_message": [None if o else "HTTP Error 404: Not Found" for o in ok],
            "width": pa.array(np.where(ok, 256, 0), pa.int32(), mask=failed),
            "height": pa.array(np.where(ok, 256, 0), pa.int32(), mask=failed),
            "original_width": pa.array(np.where(ok, 640, 0), pa.int32(), mask=failed),
            "original_height": pa.array(np.where(ok, 480, 0), pa.int32(), mask=failed),
            "exif": [("{}" if o else None) for o in ok],
            "sha256": [(f"{k:0>64}" if o else None) for k, o in zip(keys, ok)],
        }, schema=SCHEMA)
        pq.write_table(table, root / f"{name}.parquet")
        successes = int(ok.sum())
        (root / f"{name}_stats.json").write_text(json.dumps(
            {"count": rows, "successes": successes, "failed_to_download": rows - successes, "failed_to_resize": 0,
             "duration": 1.0, "start_time": 0.0, "end_time": 1.0,
             "status_dict": {"success": successes, "HTTP Error 404: Not Found": rows - successes}}, indent=4))
        os.close(os.open(root / f"{name}.tar", os.O_CREAT | os.O_WRONLY, 0o644))
    done.write_text(f"{tars} tars of {rows} URLs\n")
    return root


@contextlib.contextmanager
def tars_opened():
    """Count the tars opened through Python's `open`, `os.open` and `tarfile.open` (a list: its length)."""
    opened, saved = [], [(m, n, getattr(m, n)) for m, n in ((builtins, "open"), (io, "open"), (os, "open"),
                                                             (tarfile, "open"))]

    def wrap(fn):
        def opener(file, *args, **kwargs):
            if str(file).endswith(".tar"):
                opened.append(str(file))
            return fn(file, *args, **kwargs)
        return opener

    for m, n, fn in saved:
        setattr(m, n, wrap(fn))
    try:
        yield opened
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def read_bytes() -> int:
    """Bytes this process has read by read calls (`rchar`: the page cache's too)."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


def plan(work: Path, tars: int, rows: int) -> dict:
    """Plan the generated folder of `tars` tars of `rows` URLs once: seconds, CPU seconds, bytes read."""
    root = make_folder(work, tars, rows)
    sidecar_bytes = sum(os.path.getsize(root / f"{t:05d}.parquet") for t in range(tars))
    stats_bytes = sum(os.path.getsize(root / f"{t:05d}_stats.json") for t in range(tars))
    scan_source(root / "00000.tar")  # loads the lazy imports, so `read_mb` counts the planning's reads alone
    load = os.getloadavg()[0]
    with tars_opened() as opened:
        before, cpu, start = read_bytes(), time.process_time(), time.perf_counter()
        manifest = scan_source(root / f"{{00000..{tars - 1:05d}}}.tar")
        scan_s, cpu_s, read = time.perf_counter() - start, time.process_time() - cpu, read_bytes() - before
    start = time.perf_counter()
    manifest.fingerprint()
    print_s = time.perf_counter() - start
    assert len(manifest.files) == tars and len(manifest) == tars * (rows - len(range(3, rows, 10)))
    return {"tars": tars, "rows": rows, "samples": len(manifest), "scan_s": scan_s, "cpu_s": cpu_s,
            "fingerprint_s": print_s, "tars_per_s": tars / scan_s, "us_per_sample": scan_s / len(manifest) * 1e6,
            "read_mb": read / 1e6, "sidecar_mb": sidecar_bytes / 1e6, "stats_mb": stats_bytes / 1e6,
            "tars_opened": len(opened), "load_avg": load, "met": scan_s <= 60 if tars >= TARGET_TARS else None}


def make_tars(work: Path, tars: int) -> Path:
    """Generate (once) `tars` tars without sidecars: one real tar of 4 members, hard-linked."""
    root = work / f"plan-unlisted-{tars}"
    done = root / "complete.txt"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    first = None
    for t in range(tars):
        path = root / f"{t:05d}.tar"
        path.unlink(missing_ok=True)
        if t % LINKS == 0:
            with tarfile.open(path, "w") as tar:
                for k in range(4):
                    info = tarfile.TarInfo(f"{t:05d}{k:04d}.jpg")
                    info.size = 10_000
                    tar.addfile(info, io.BytesIO(bytes(info.size)))
            first = path
        else:
            os.link(first, path)
    done.write_text(f"{tars} tars\n")
    return root


def plan_unlisted(work: Path, tars: int, per_tar: int) -> dict:
    """Plan `tars` tars without sidecars, `per_tar` rows each, once: seconds, CPU seconds, bytes read, tars opened."""
    root = make_tars(work, tars)
    scan_source(root / "00000.tar", tar_samples=per_tar)  # the lazy imports
    load = os.getloadavg()[0]
    with tars_opened() as opened:
        before, cpu, start = read_bytes(), time.process_time(), time.perf_counter()
        manifest = scan_source(root / f"{{00000..{tars - 1:05d}}}.tar", tar_samples=per_tar)
        scan_s, cpu_s, read = time.perf_counter() - start, time.process_time() - cpu, read_bytes() - before
    start = time.perf_counter()
    manifest.fingerprint()
    print_s = time.perf_counter() - start
    assert len(manifest.files) == tars and len(manifest) == tars * per_tar
    return {"mode": "unlisted", "tars": tars, "rows": per_tar, "samples": len(manifest), "scan_s": scan_s,
            "cpu_s": cpu_s, "fingerprint_s": print_s, "tars_per_s": tars / scan_s, "read_mb": read / 1e6,
            "tar_mb": tars * os.path.getsize(root / "00000.tar") / 1e6, "tars_opened": len(opened), "load_avg": load,
            "met": scan_s <= 60 if tars >= TARGET_TARS else None}


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--shapes", nargs="*", help="generated folders, TARSxROWS: TARS tars of ROWS URLs each")
    p.add_argument("--unlisted", nargs="*", help="tars without sidecars, TARSxROWS: TARS tars planned ROWS rows each")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
    rows = [{"mode": "sidecars", **plan(Path(args.work), tars, per_tar)} for tars, per_tar in shapes]
    rows += [plan_unlisted(Path(args.work), *(int(v) for v in shape.split("x"))) for shape in args.unlisted]
    payload = common.meta(torch.device("cpu"), __file__, args.argv, threads=SIDECAR_THREADS, target_s=60)
    columns = [("mode", "planned from", ""), ("tars", "tars", "d"), ("rows", "URLs (rows)/tar", "d"), ("samples", "samples", "d"),
               ("scan_s", "scan s", ".2f"), ("cpu_s", "CPU s", ".1f"), ("fingerprint_s", "fingerprint s", ".2f"),
               ("tars_per_s", "tars/s", "n"), ("us_per_sample", "us/sample", ".2f"), ("read_mb", "read MB", ".1f"),
               ("sidecar_mb", "sidecars MB", ".1f"), ("stats_mb", "stats MB", ".1f"), ("tar_mb", "tars MB", ".0f"),
               ("tars_opened", "tars opened", "d"), ("load_avg", "load", ".1f"), ("met", "<= 60 s", "")]
    return common.report(payload, rows, columns, args.json_out,
                         title="Build planning from img2dataset sidecars (no tar read) or unlisted (a header block a tar; "
                               "warm page cache; load: the machine's 1-min load average before)")


if __name__ == "__main__":
    main()
