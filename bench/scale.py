"""A million samples: what `radio-train` does before its first step, and its memory, on an ImageNet-sized store.

Writes (once; reused while complete) a store of N samples through the store API: `create_store` with a
Manifest of ImageNet-like ids (`nXXXXXXXX/nXXXXXXXX_K.JPEG` over 1000 classes), 2 views, three teachers
with ViT-L-like dims (CLIP 768 summary / 1024 spatial at 16x16, DINOv2 1024 / 1024 at 16x16, SAM
- / 256 at 64x64; int8 spatial, fp16 summary), every sample ok and every shard done. Targets stay
fill values except those of the first `--read` samples (a constant, so the loader has something to
read): shard 0's files are written by tensorstore and hard-linked as every other shard's, since a done
shard must have its files (compressing terabytes of zeros would take hours); the integrity record holds
each shard file's size, as a build's does. The image folder holds an
empty file per id, and a small JPEG for the samples the loader reads.

Measured in a fresh spawned process, as `train()` runs them before its first step:
  open_s: `CacheReader(store)` (sample arrays, done flags, the lost-shard check) + `indices` (the
  split) + `check_images`; also each part alone;
  rss_main_mb: that process's peak RSS after opening and reading a few batches with spawned loader workers;
  rss_worker_mb: the largest loader worker's peak RSS minus that of an idle spawned process that
  imported torch (`rss_idle_worker_mb`).
Targets at N = 1,281,167 (ImageNet-1k train): open <= 10 s, main <= 2 GB, each worker <= 0.5 GB above idle.
Linux only (peak RSS from /proc).

    python bench/scale.py --samples 1281167 --json scale.json
    python bench/scale.py --quick                 # 20k samples
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from radio_distill.store import layout as L
from radio_distill.store import provenance
from radio_distill.store.dataset import Manifest
from radio_distill.store.lock import build_lock
from radio_distill.store.location import location
from radio_distill.store.group import create_store, open_array, open_store, shard_key
from radio_distill.store.layout import TeacherInfo

FULL = dict(samples=common.IMAGENET_TRAIN, read=32, batch_size=8, workers=2)
QUICK = dict(samples=20_000, read=32, batch_size=8, workers=2)
CLASSES = 1000
SHARD_SIZE, VIEWS = 256, 2
NORM = ((0.5,) * 3, (0.5,) * 3)
INFOS = {"clip": TeacherInfo(224, *NORM, (16, 16), 768, 1024), "dinov2": TeacherInfo(224, *NORM, (16, 16), 1024, 1024),
         "sam": TeacherInfo(1024, *NORM, (64, 64), None, 256)}
LIMITS = {"open_s": 10.0, "rss_main_mb": 2048.0, "rss_worker_mb": 512.0}


def manifest(n: int, images: Path) -> Manifest:
    """n ImageNet-like ids, sorted, spread evenly over 1000 WordNet-style class folders."""
    wnids = [f"n{1440764 + 97 * c:08d}" for c in range(CLASSES)]
    per = -(-n // CLASSES)
    labels = np.arange(n) // per
    ids = [f"{wnids[c]}/{wnids[c]}_{k}.JPEG" for k, c in enumerate(labels.tolist())]
    return Manifest(images, tuple(ids), tuple(labels.tolist()), tuple(wnids))


def write_store(path: Path, images: Path, n: int, read: int) -> None:
    """The store of n samples described above (skipped when a complete one is there)."""
    if _complete(path, n):
        return
    m = manifest(n, images)
    storage = {name: {"spatial": "int8", "summary": "fp16", "pool": 1} for name in INFOS}
    settings = {"teachers": {name: {"family": name, "bench": "scale"} for name in INFOS}, "storage": storage,
                "pixels": None, "views": VIEWS, "seed": 0, "shard_size": SHARD_SIZE, "dataset": m.fingerprint(),
                "num_samples": n}
    with build_lock(path):
        root = create_store(path, manifest=m, settings=settings, infos=INFOS)
        n_shards = L.shard_count(n, SHARD_SIZE)
        writes = [open_array(path, L.STATUS).write(np.full(n, L.OK, np.uint8)),
                  open_array(path, L.BOXES).write(np.tile(np.float32([0, 0, 64, 64]), (n, VIEWS, 1)))]
        for name in INFOS:
            for array in (p for p in L.target_arrays(name) if p in root):
                handle = open_array(path, array)
                first = np.zeros((min(SHARD_SIZE, n), *handle.shape[1:]), handle.dtype.numpy_dtype)
                first[:read] = 1
                handle[:len(first)].write(first).result()
                key = root[array].metadata.encode_chunk_key((0,) * handle.rank)
                for k in range(1, n_shards):  # the same bytes hold for any shard: chunk data is position-free
                    other = path / array / root[array].metadata.encode_chunk_key((k,) + (0,) * (handle.rank - 1))
                    other.parent.mkdir(parents=True, exist_ok=True)
                    os.link(path / array / key, other)
        for w in writes:
            w.result()
        _record(path, root, n_shards, read)
        for name in INFOS:  # done last, as a build marks shards
            open_array(path, L.done_array(name)).write(np.ones(n_shards, np.uint8)).result()


def _record(path: Path, root, n_shards: int, read: int) -> None:
    """Write the arrays a build writes per shard that are still empty (the images' sources as they are),
    then the integrity record a build keeps: each shard file's size (the open compares sizes; value digests are for `verify`, not run here)."""
    ids = manifest(root.attrs["num_samples"], Path(root.attrs["dataset"]["root"])).ids
    stats = provenance.file_stats([Path(root.attrs["dataset"]["root"]) / i for i in ids])
    sources = np.column_stack([stats, np.full(len(ids), provenance.digest(b""), np.int64)])
    for k, sample_id in enumerate(ids[:read]):  # the JPEGs; every other image is an empty file
        sources[k, 2] = provenance.digest((Path(root.attrs["dataset"]["root"]) / sample_id).read_bytes())
    open_array(path, L.SOURCES).write(sources).result()
    root[L.ERRORS][:] = np.full(root[L.ERRORS].shape, "", dtype=object)
    arrays = root[L.SHARDS].attrs["arrays"]
    for array in (a for a in arrays if "/moments/" in a):
        open_array(path, array).write(np.zeros(root[array].shape, root[array].dtype)).result()
    record = np.zeros((n_shards, len(arrays), 2), np.int64)
    for j, array in enumerate(arrays):
        sizes, meta = location(path).sizes(array), root[array].metadata
        for k in range(n_shards):
            key = shard_key(meta, array, k, n_shards)
            if key is not None:
                record[k, j, 0] = sizes[key]
    open_array(path, L.SHARDS).write(record).result()


def _complete(path: Path, n: int) -> bool:
    try:
        root = open_store(path)
    except Exception:
        return False
    done = [open_array(path, L.done_array(name)).read().result() for name in INFOS]
    return root.attrs["num_samples"] == n and all(d.all() for d in done)


def write_images(images: Path, ids, read: int) -> None:
    """An empty file per id (once), a 64 px JPEG for the first `read`."""
    marker = images / f".complete-{len(ids)}"
    if marker.is_file():
        return
    for folder in sorted({i.split("/", 1)[0] for i in ids}):
        (images / folder).mkdir(parents=True, exist_ok=True)
    for k, sample_id in enumerate(ids):
        path = images / sample_id
        if k < read:
            Image.fromarray(np.full((64, 64, 3), 40 + k, np.uint8)).save(path, "JPEG")
        elif not path.exists():
            path.touch()
    marker.touch()


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children(pid: int | str = "self") -> list[int]:
    pid = os.getpid() if pid == "self" else pid
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def measure(store: str, read: int, batch_size: int, workers: int) -> dict:
    """In a fresh process: train()'s steps before its first step, timed, then a few loader batches."""
    torch.set_num_threads(1)
    from radio_distill.store.reader import CacheReader

    start = time.perf_counter()
    reader = CacheReader(store)
    opened = time.perf_counter()
    indices = reader.indices(holdout=0.05)
    split = time.perf_counter()
    reader.check_images(indices, resolution=64)
    checked = time.perf_counter()
    readable = indices[indices < read]
    steps = 2 * workers
    loader = reader.loader(readable, resolution=64, batch_size=batch_size, seed=0, start_step=0, steps=steps,
                           workers=workers)
    it = iter(loader)
    for _ in range(steps):
        batch = next(it)
    assert batch["pixels"].shape == (batch_size, 3, 64, 64)
    worker_rss = [peak_rss_mb(pid) for pid in children()]
    del it, loader
    return {"open_s": checked - start, "reader_s": opened - start, "split_s": split - opened,
            "image_check_s": checked - split, "rss_main_mb": peak_rss_mb(), "worker_peak_mb": max(worker_rss),
            "train_samples": len(indices)}


def _idle() -> float:
    import torch  # noqa: F401 - what every spawned loader worker holds before it gets its dataset
    return peak_rss_mb()


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--samples", type=int, help="samples in the store (default: ImageNet-1k's 1,281,167)")
    p.add_argument("--read", type=int, help="samples with targets and a JPEG, read by the loader")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="spawned loader workers")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    store = Path(args.work) / "stores" / f"scale-{args.samples}.zarr"
    images = Path(args.work) / f"scale-images-{args.samples}"
    started = time.perf_counter()
    write_images(images, manifest(args.samples, images).ids, args.read)
    write_store(store, images, args.samples, args.read)
    setup_s = time.perf_counter() - started
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        idle = pool.submit(_idle).result()
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        row = pool.submit(measure, str(store), args.read, args.batch_size, args.workers).result()
    row = {"samples": args.samples, **row, "rss_idle_worker_mb": idle, "rss_worker_mb": row["worker_peak_mb"] - idle}
    row["met"] = all(row[k] <= v for k, v in LIMITS.items()) if args.samples >= common.IMAGENET_TRAIN else None
    payload = common.meta(torch.device("cpu"), __file__, args.argv, store=str(store), views=VIEWS,
                          shard_size=SHARD_SIZE, workers=args.workers, setup_s=setup_s,
                          limits={k: f"<= {v:g}" for k, v in LIMITS.items()})
    columns = [("samples", "samples", "d"), ("open_s", "open s", ".2f"), ("reader_s", "reader s", ".2f"),
               ("split_s", "split s", ".2f"), ("image_check_s", "image check s", ".2f"),
               ("rss_main_mb", "main MB", ".0f"), ("rss_worker_mb", "worker MB above idle", ".0f"),
               ("rss_idle_worker_mb", "idle worker MB", ".0f"), ("met", "targets met", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title="radio-train before its first step, on an ImageNet-sized store")


if __name__ == "__main__":
    main()
