"""A killed build of many shards resumes to the store one build makes: `radio-cache build` killed (SIGKILL, the
driver and the Ray it started) once about half its shards are done, then the same command to the end, against
the same build run once without a kill.

The generated photos (bench/common.py) as a list file, tiny teachers, one view, shards of `--shard-size` (one
image by default, so 10,240 photos are 10,240 shards: the done state spans several of its chunks and its
commits), `--workers` CPU Ray actors. Reported: shards, the seconds of the uninterrupted build, when the kill
came (shards done then), the seconds of the resume, and whether the two stores hold the same values in every
array and the same bytes in every file (but the temporary files a killed write leaves, which nothing reads).

    python bench/resume.py --json resume.json     # 10,240 shards, ~25 min on 2 cores
    python bench/resume.py --quick                # 256 shards
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import common
from radio_distill.store import layout as L
from radio_distill.store.group import open_array

FULL = dict(images=10_240, shard_size=1, workers=2)
QUICK = dict(images=256, shard_size=1, workers=2)
CLI = "import sys; from radio_distill.cli import cache_app; sys.argv[0] = 'radio-cache'; cache_app()"


def command(listing: Path, out: Path, shard_size: int, workers: int) -> list[str]:
    return [sys.executable, "-c", CLI, "build", str(listing), "--out", str(out), "--teachers", "tiny", "--views", "1",
            "--shard-size", str(shard_size), "--workers", str(workers)]


def done(out: Path) -> int:
    try:
        return int(open_array(out, L.done_array("clip")).read().result().sum())
    except Exception:  # not created yet
        return 0


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def digests(path: Path) -> dict:
    """sha256 of every file but a killed write's temporary ones (zarr's `<key>.<uuid>.partial`)."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not re.search(r"\.[0-9a-f]{32}\.partial$", p.name)
            and p.name not in (L.LOCK_FILE, L.HOLDER_FILE)}


def same_values(a: Path, b: Path) -> bool:
    """The same arrays, holding equal values."""
    ra, rb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    arrays = [n for n, _ in _walk(ra)]
    return bool(arrays) and arrays == [n for n, _ in _walk(rb)] and all(np.array_equal(ra[n][...], rb[n][...])
                                                                         for n in arrays)


def _walk(group, prefix=""):
    for name, array in sorted(group.arrays()):
        yield f"{prefix}{name}", array
    for name, sub in sorted(group.groups()):
        yield from _walk(sub, f"{prefix}{name}/")


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    for flag in ("images", "shard-size", "workers"):
        p.add_argument(f"--{flag}", type=int)
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    listing = common.make_jpegs(args.images, work=args.work)
    stores = Path(args.work) / "stores"
    once, killed = (stores / f"resume-{name}-{args.images}.zarr" for name in ("once", "killed"))
    for path in (once, killed):
        shutil.rmtree(path, ignore_errors=True)
    shards = L.shard_count(args.images, args.shard_size)
    once_s = run(command(listing, once, args.shard_size, args.workers))

    build = subprocess.Popen(command(listing, killed, args.shard_size, args.workers), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.perf_counter()
    while done(killed) < shards // 2 and build.poll() is None:
        time.sleep(0.5)
    if build.poll() is None:  # a small build may finish before the poll sees half of it done
        os.killpg(build.pid, signal.SIGKILL)  # the driver and the Ray it started
    build.wait()
    killed_at, at_kill = time.perf_counter() - started, done(killed)
    resume_s = run(command(listing, killed, args.shard_size, args.workers))
    row = {"shards": shards, "build_s": once_s, "killed_after_s": killed_at, "done_at_kill": at_kill,
           "resume_s": resume_s, "same_values": same_values(once, killed), "same_bytes": digests(once) == digests(killed),
           "killed": build.returncode < 0}
    payload = common.meta(torch.device("cpu"), __file__, args.argv, images=args.images, shard_size=args.shard_size,
                          workers=args.workers, teachers="tiny (toy size, random weights)")
    columns = [("shards", "shards", "d"), ("build_s", "one build s", ".1f"), ("killed", "killed", ""),
               ("killed_after_s", "killed after s", ".1f"),
               ("done_at_kill", "done at the kill", "d"), ("resume_s", "resume s", ".1f"),
               ("same_values", "same values", ""), ("same_bytes", "same bytes", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title="A build killed halfway resumes to the store one build makes")


if __name__ == "__main__":
    main()
