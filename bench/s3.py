"""Stores on S3: what `radio-cache build`, a rerun, `verify` and opening for training cost on an S3 server
vs on a local folder, in seconds and in requests (what S3 bills, and what its latency multiplies).

The server is moto in server mode on 127.0.0.1 (the tests' server), so its seconds are a local
process's, not a region's: read the request counts, which are the same against any S3. They are counted
from the server's request log. The same generated photos (bench/common.py) are built twice at two sizes
(--images and half of it, tiny teachers, one view, --shard-size) so the requests of one more shard
come out of the difference; every build is fresh (--overwrite). Then, on the larger store:

- rerun: the same build command on the complete store (nothing to do: the fixed cost of a resume);
- verify: `radio-cache verify` (every chunk read and its crc32c checked);
- open: `CacheReader`, what `radio-train` opens before its first step (store checks, done state, split).

Then the done state at scale (`--shards`, 100,000 by default): a store of that many shards (one sample
each, tiny teachers) is created locally with `create_store`, its shards marked done and stamped as a
build's driver would, and only its metadata and done state (zarr.json files, done flags, status, stamps,
split keys, integrity record: what a rerun reads) are copied to S3; targets and per-shard sample files
stay unwritten (nothing reads them when nothing is left to do). Its images do not exist: a rerun stats
them all (the same missing files as when the stamps were taken), as it stats a real dataset's.
- rerun (complete): the build command on it, until it reports that nothing is left to do;
- resume (half done): half its shards marked not done, the same command with --max-shards 1: the
  seconds until the first shard is written (Ray and a worker started, the teachers loaded, included).

    python bench/s3.py --json s3.json      # 1024 photos, shards of 64; 100,000 shards
    python bench/s3.py --quick             # 32 photos, shards of 8; 2,000 shards
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig, Storage
from radio_distill.cache.teachers import build_teacher, identity
from radio_distill.store import layout as L
from radio_distill.store import provenance
from radio_distill.store.dataset import scan_dataset
from radio_distill.store.group import create_store, open_array
from radio_distill.store.inspect import verify_store
from radio_distill.store.location import ENVIRONMENT, location
from radio_distill.store.reader import CacheReader
from radio_distill.store.sources import Images

FULL = dict(images=1024, shard_size=64, shards=100_000)
QUICK = dict(images=32, shard_size=8, shards=2_000)
BUCKET = "bench"
REQUEST = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) ')


class Server:
    """moto's S3 server on a free local port, its request log in `log`; sets the AWS_* variables until `stop`."""

    def __init__(self, log: Path):
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                            stdout=out, stderr=out)
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        self.saved = {k: os.environ.get(k) for k in ENVIRONMENT}
        for k in ENVIRONMENT:
            os.environ.pop(k, None)
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_REGION="us-east-1")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)

    def requests(self) -> int:
        time.sleep(0.5)  # the server logs a request once it has answered it
        return sum(1 for line in self.log.read_text(errors="replace").splitlines() if REQUEST.search(line))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        for k, value in self.saved.items():
            if value is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = value


def measure(server: Server, phase, *args, **kwargs) -> tuple[float, int]:
    """(seconds, S3 requests) of `phase(*args, **kwargs)`."""
    before, started = server.requests(), time.perf_counter()
    phase(*args, **kwargs)
    seconds = time.perf_counter() - started
    return seconds, server.requests() - before


def build(listing: Path, out: str, *, shard_size: int, overwrite: bool) -> None:
    report = build_cache(CacheConfig(data=listing, out=out, teachers=tuple(common.teacher_specs("tiny")), views=1,
                                     shard_size=shard_size, workers=1, overwrite=overwrite), progress=False)
    assert report["complete"], report


DONE_STATE = (L.STATUS, L.STAMPS, L.SPLIT, L.SHARDS)  # besides the done flags: what a rerun reads


def done_state_store(work: Path, shards: int) -> tuple[Path, Path]:
    """(list file, local store): `shards` one-sample shards of images that do not exist, all done, each stamped
    with its images' stats and recorded as a build's driver would; its targets unwritten."""
    listing = work / f"absent-{shards}.txt"
    listing.write_text("".join(f"absent/{k:07d}.jpg\n" for k in range(shards)))
    manifest = scan_dataset(listing)
    specs = common.teacher_specs("tiny")
    infos = {s.name: build_teacher(s).info() for s in specs}
    cfg = CacheConfig(data=listing, out=str(work), teachers=tuple(specs), views=1, shard_size=1)
    settings = {"teachers": {s.name: identity(s) for s in specs}, "storage": {s.name: Storage().settings() for s in specs},
                "pixels": None, "views": 1, "seed": cfg.seed, "shard_size": 1, "dataset": manifest.fingerprint(),
                "num_samples": len(manifest)}
    store = work / "stores" / f"done-state-{shards}.zarr"
    root = create_store(store, manifest=manifest, settings=settings, infos=infos)
    stats = provenance.source_stats(Images(manifest.source()), manifest.ids, None)
    open_array(store, L.STAMPS).write(np.array([provenance.stats_digest(stats[k:k + 1]) for k in range(shards)])).result()
    open_array(store, L.STATUS).write(np.full(shards, L.OK, np.uint8)).result()
    for s in specs:
        open_array(store, L.done_array(s.name)).write(np.ones(shards, np.uint8)).result()
        root[L.teacher_group(s.name)].attrs["fidelity"] = {}  # reduced, as a complete build leaves it
    return listing, store


def upload_done_state(store: Path, url: str) -> int:
    """Copy the store's metadata and done state to `url`; the number of objects copied."""
    target, keys = location(url), []
    done = {L.done_array(name) for name in json.loads((store / "zarr.json").read_text())["attributes"]["settings"]["teachers"]}
    for path in sorted(store.rglob("*")):
        key = path.relative_to(store).as_posix()
        if path.is_file() and (path.name == "zarr.json" or any(key.startswith(f"{a}/c") for a in (*DONE_STATE, *done))):
            keys.append(key)
    for key in keys:
        target.fs.put_file(str(store / key), target.key(key))
    return len(keys)


def scale_rows(server: Server, work: Path, shards: int) -> list[dict]:
    listing, store = done_state_store(work, shards)
    url = f"s3://{BUCKET}/done-state-{shards}.zarr"
    objects = upload_done_state(store, url)

    def rerun(max_shards=None):
        report = build_cache(CacheConfig(data=listing, out=url, teachers=tuple(common.teacher_specs("tiny")), views=1,
                                         shard_size=1, workers=1, max_shards=max_shards), progress=False)
        return report

    rows = []
    seconds, requests = measure(server, rerun)
    rows.append({"place": "s3", "phase": f"rerun, complete, {shards:,} shards", "seconds": seconds, "requests": requests,
                 "requests_per_100_shards": 100 * requests / shards, "objects": objects})
    for name in json.loads((store / "zarr.json").read_text())["attributes"]["settings"]["teachers"]:
        open_array(url, L.done_array(name))[shards // 2:].write(np.zeros(shards - shards // 2, np.uint8)).result()
    seconds, requests = measure(server, rerun, 1)
    rows.append({"place": "s3", "phase": f"resume, half done, {shards:,} shards: first shard written",
                 "seconds": seconds, "requests": requests, "requests_per_100_shards": 100 * requests / shards,
                 "objects": objects})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--shards", type=int, help="shards of the done-state store (rerun and resume at scale)")
    for flag in ("images", "shard-size"):
        p.add_argument(f"--{flag}", type=int)
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    server = Server(args.work / "moto.log")
    rows = []
    try:
        sizes = (args.images // 2, args.images)
        listings = {n: common.make_jpegs(n, work=args.work) for n in sizes}
        for place in ("local", "s3"):
            stores = {n: (f"s3://{BUCKET}/bench-{n}.zarr" if place == "s3" else
                          str(args.work / "stores" / f"s3-bench-local-{n}.zarr")) for n in sizes}
            built = {}
            for n in sizes:
                built[n] = measure(server, build, listings[n], stores[n], shard_size=args.shard_size, overwrite=True)
            shards = {n: -(-n // args.shard_size) for n in sizes}
            per_shard = (built[sizes[1]][1] - built[sizes[0]][1]) / (shards[sizes[1]] - shards[sizes[0]])
            store = stores[sizes[1]]
            phases = {f"build {n}": built[n] for n in sizes}
            phases["rerun"] = measure(server, build, listings[sizes[1]], store, shard_size=args.shard_size,
                                      overwrite=False)
            phases["verify"] = measure(server, verify_store, store)
            phases["open"] = measure(server, CacheReader, store)
            for phase, (seconds, requests) in phases.items():
                rows.append({"place": place, "phase": phase, "seconds": seconds,
                             "requests": requests if place == "s3" else None,
                             "requests_per_shard": per_shard if place == "s3" and phase == f"build {sizes[1]}" else None})
                print(rows[-1])
        rows += scale_rows(server, args.work, args.shards)
        print(rows[-2:])
    finally:
        server.stop()
    payload = common.meta(torch.device("cpu"), __file__, args.argv, teachers="tiny (toy size, random weights)",
                          server="moto (local process)", shard_size=args.shard_size)
    columns = [("place", "store", ""), ("phase", "phase", ""), ("seconds", "s", ".2f"), ("requests", "requests", "d"),
               ("requests_per_shard", "requests / extra shard", ".0f"),
               ("requests_per_100_shards", "requests / 100 shards", ".2f")]
    return common.report(payload, rows, columns, args.json_out,
                         title=f"Stores on S3 (local moto server) vs a local folder: {args.images} photos, "
                               f"shards of {args.shard_size}, tiny teachers, one view")


if __name__ == "__main__":
    main()
