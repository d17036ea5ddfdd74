"""DataComp scale: what `radio-train` does before its first step, and its memory, on stores of 1M to 100M samples.

Writes (once; reused while complete) a store of N samples through the store API, without holding its ids:
`create_store` with a Manifest whose ids, labels and locations are generated a block at a time. The dataset
is laid out as img2dataset writes DataComp: WebDataset tars of 10,000 samples (`00000.tar` ...), ids
`<tar>/<key>`, keys of 9 digits, no labels. Its tars are hard links of one small tar of `--read` JPEGs, and
sample k's location is member k mod `--read` of its tar, so every sample is readable and the disk holds one
tar. 2 views, three teachers with ViT-L-like dims (CLIP 768 summary / 1024 spatial at 16x16, DINOv2 1024 /
1024 at 16x16, SAM - / 256 at 64x64; int8 spatial, fp16 summary), every sample ok, every shard done, shards
of 1024 samples (98k shards at 100M: a file per shard and array, never one per sample). Targets hold a
constant in the first `--read` rows of every shard and zeros elsewhere: shard 0's files are written by
tensorstore and hard-linked as every other shard's, since a done shard must have its files (compressing
terabytes of zeros would take hours); the integrity record holds each shard file's size, as a build's does.

Measured in a fresh spawned process right after the store is written or found, as `train()` runs them
before its first step:
  open_s: `CacheReader(store)` (done flags) + `indices` (the split: nothing read) + `check_images` (the status
  and split keys of 4 blocks, a stat per tar); also each part alone;
  first_batch_s: the sampler's first global batch of 1,024 from the split, which reads the status and split
  keys of every block it draws from (all of them, at 100M), then a second (`next_batch_s`);
  rss_main_mb: that process's peak RSS after opening and reading a few batches with spawned loader workers;
  rss_worker_mb: the largest loader worker's peak RSS minus that of an idle spawned process that
  imported torch (`rss_idle_worker_mb`);
then, in that process, `radio-cache info`'s `store_info` (info_s) and the listing of every shard file that
`verify` and `verify --repair` start with (`lost_shards`, listing_s).
Targets: open <= 2 s at 1,281,167 samples (ImageNet-1k train) and <= 10 s at 100M; main <= 1 GB; each worker
<= 0.5 GB above idle. Linux only (peak RSS from /proc).

    python bench/scale.py --samples 1281167 --json scale.json
    python bench/scale.py --samples 100000000 --json scale-100m.json
    python bench/scale.py --quick                 # 20k samples
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from radio_distill.store import layout as L
from radio_distill.store import provenance
from radio_distill.store.dataset import Generated, Manifest
from radio_distill.store.lock import build_lock
from radio_distill.store.location import location
from radio_distill.store.group import create_store, open_array, open_store, shard_key
from radio_distill.store.layout import TeacherInfo

FULL = dict(samples=common.IMAGENET_TRAIN, read=32, batch_size=8, workers=2)
QUICK = dict(samples=20_000, read=32, batch_size=8, workers=2)
PER_TAR = 10_000  # img2dataset's default samples per tar
MAX_LINKS = 60_000  # hard links made to one file (ext4 allows 65,000)
SHARD_SIZE, VIEWS = 1024, 2
BLOCK = SHARD_SIZE * 1024  # rows written at a time
NORM = ((0.5,) * 3, (0.5,) * 3)
INFOS = {"clip": TeacherInfo(224, *NORM, (16, 16), 768, 1024), "dinov2": TeacherInfo(224, *NORM, (16, 16), 1024, 1024),
         "sam": TeacherInfo(1024, *NORM, (64, 64), None, 256)}
LIMITS = {"open_s": 2.0, "rss_main_mb": 1024.0, "rss_worker_mb": 512.0}
LIMITS_100M = {"open_s": 10.0, "rss_main_mb": 1024.0, "rss_worker_mb": 512.0}


def tar_names(n: int) -> tuple[str, ...]:
    return tuple(f"{t:05d}.tar" for t in range(-(-n // PER_TAR)))


def manifest(n: int, images: Path, members: np.ndarray) -> Manifest:
    """n DataComp-like samples: ids `<tar>/<key>`, unlabelled, located in their tar at `members` (read, 2)."""
    def ids(rows):
        return [f"{t:05d}.tar/{t:05d}{k:04d}" for t, k in zip((rows // PER_TAR).tolist(), (rows % PER_TAR).tolist())]

    def locations(rows):
        return np.column_stack([rows // PER_TAR, members[rows % len(members)]]).astype(np.int64)

    return Manifest(images, Generated(n, ids), Generated(n, lambda rows: np.full(len(rows), -1, np.int32)), (),
                    kind="tar", files=tar_names(n), locations=Generated(n, locations))


def write_images(images: Path, n: int, read: int) -> np.ndarray:
    """One tar of `read` JPEG members (once), hard-linked as every tar of the dataset; (read, 2) int64 (data
    offset, size) of its members."""
    images.mkdir(parents=True, exist_ok=True)
    first = images / tar_names(1)[0]
    if not first.is_file():
        with tarfile.open(first, "w") as tar:
            for k in range(read):
                data = io.BytesIO()
                Image.fromarray(np.full((64, 64, 3), 40 + k, np.uint8)).save(data, "JPEG")
                info = tarfile.TarInfo(f"{k:09d}.jpg")
                info.size = len(data.getvalue())
                tar.addfile(info, io.BytesIO(data.getvalue()))
    for name in tar_names(n)[1:]:
        if not (images / name).exists():
            os.link(first, images / name)
    with tarfile.open(first) as tar:
        return np.array([(m.offset_data, m.size) for m in tar], np.int64)


def write_store(path: Path, images: Path, n: int, read: int, members: np.ndarray) -> None:
    """The store of n samples described above (skipped when a complete one is there)."""
    if _complete(path, n):
        return
    m = manifest(n, images, members)
    storage = {name: {"spatial": "int8", "summary": "fp16", "pool": 1} for name in INFOS}
    settings = {"teachers": {name: {"family": name, "bench": "scale"} for name in INFOS}, "storage": storage,
                "pixels": None, "views": VIEWS, "seed": 0, "shard_size": SHARD_SIZE, "dataset": f"scale-{n}",
                "num_samples": n}
    with build_lock(path):
        root = create_store(path, manifest=m, settings=settings, infos=INFOS)
        n_shards = L.shard_count(n, SHARD_SIZE)
        for name in INFOS:
            for array in (p for p in L.target_arrays(name) if p in root):
                handle = open_array(path, array)
                first = np.zeros((min(SHARD_SIZE, n), *handle.shape[1:]), handle.dtype.numpy_dtype)
                first[:read] = 1
                handle[:len(first)].write(first).result()
                source = path / array / root[array].metadata.encode_chunk_key((0,) * handle.rank)
                for k in range(1, n_shards):  # the same bytes hold for any shard: chunk data is position-free
                    other = path / array / root[array].metadata.encode_chunk_key((k,) + (0,) * (handle.rank - 1))
                    other.parent.mkdir(parents=True, exist_ok=True)
                    if k % MAX_LINKS:
                        os.link(source, other)
                    else:  # a file has at most 65,000 links on ext4: a copy to link from next
                        shutil.copyfile(source, other)
                        source = other
        tar = images / tar_names(1)[0]
        mtime, digests = tar.stat().st_mtime_ns, [provenance.digest(tar.read_bytes()[a:a + b]) for a, b in members]
        status, boxes, sources = (open_array(path, a) for a in (L.STATUS, L.BOXES, L.SOURCES))
        for start in range(0, n, BLOCK):  # a block at a time: 100M boxes alone are 3.2 GB
            rows = np.arange(start, min(n, start + BLOCK))
            member = rows % len(members)
            writes = [status[rows[0]:rows[-1] + 1].write(np.full(len(rows), L.OK, np.uint8)),
                      boxes[rows[0]:rows[-1] + 1].write(np.broadcast_to(np.float32([0, 0, 64, 64]), (len(rows), VIEWS, 4))),
                      sources[rows[0]:rows[-1] + 1].write(np.column_stack([members[member, 1], np.full(len(rows), mtime),
                                                                           np.asarray(digests)[member]]))]
            for w in writes:
                w.result()
        for array in (a for a in root[L.SHARDS].attrs["arrays"] if "/moments/" in a):
            open_array(path, array).write(np.zeros(root[array].shape, root[array].dtype)).result()
        _record(path, root, n_shards)
        for name in INFOS:  # done last, as a build marks shards
            open_array(path, L.done_array(name)).write(np.ones(n_shards, np.uint8)).result()


def _record(path: Path, root, n_shards: int) -> None:
    """The integrity record a build keeps: each shard file's size (training compares sizes; the value digests
    are for `verify`, not run here, and stay 0)."""
    arrays = root[L.SHARDS].attrs["arrays"]
    record = open_array(path, L.SHARDS)
    for start in range(0, n_shards, L.RECORD_CHUNK * 64):
        shards = range(start, min(n_shards, start + L.RECORD_CHUNK * 64))
        rows = np.zeros((len(shards), len(arrays), 2), np.int64)
        for j, array in enumerate(arrays):
            meta = root[array].metadata
            keys = [shard_key(meta, array, k, n_shards) for k in shards]
            rows[:, j, 0] = [0 if key is None else os.stat(path / array / key).st_size for key in keys]
        record[shards.start:shards.stop].write(rows).result()


def _complete(path: Path, n: int) -> bool:
    try:
        root = open_store(path)
    except Exception:
        return False
    done = [open_array(path, L.done_array(name)).read().result() for name in INFOS]
    return root.attrs["num_samples"] == n and all(d.all() for d in done)


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def children(pid: int | str = "self") -> list[int]:
    pid = os.getpid() if pid == "self" else pid
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def measure(store: str, read: int, batch_size: int, workers: int, listing: bool = True) -> dict:
    """In a fresh process: train()'s steps before its first step, timed, then a few loader batches."""
    torch.set_num_threads(1)
    from radio_distill.store.group import lost_shards
    from radio_distill.store.inspect import store_info
    from radio_distill.store.reader import CacheReader, StepSampler

    start = time.perf_counter()
    reader = CacheReader(store)
    opened = time.perf_counter()
    indices = reader.indices(holdout=0.05)
    split = time.perf_counter()
    reader.check_images(indices, resolution=64)
    checked = time.perf_counter()
    opened_reads = indices.reads  # status and split-key chunks read by the open
    sampler = StepSampler(indices, views=VIEWS, resolution=64, batch_size=1024, seed=0, start_step=0, steps=2)
    sampler.global_batch(0)
    drawn = time.perf_counter()
    sampler.global_batch(1)
    again = time.perf_counter()
    first = indices.row(np.arange(min(indices.space, 4 * SHARD_SIZE)))  # the first shards' rows: no (N,) array
    first = first[indices.contains(first)]
    readable = first[first % SHARD_SIZE < read][:4 * batch_size * workers]  # rows whose targets are not zeros
    steps = 2 * workers
    loader = reader.loader(readable, resolution=64, batch_size=batch_size, seed=0, start_step=0, steps=steps,
                           workers=workers)
    it = iter(loader)
    for _ in range(steps):
        batch = next(it)
    assert batch["pixels"].shape == (batch_size, 3, 64, 64)
    worker_rss = [peak_rss_mb(pid) for pid in children()]
    del it, loader
    rss = peak_rss_mb()
    started = time.perf_counter()
    store_info(store)
    info = time.perf_counter()
    if listing:
        lost_shards(store, open_store(store))
    listed = time.perf_counter()
    return {"open_s": checked - start, "reader_s": opened - start, "split_s": split - opened,
            "image_check_s": checked - split, "first_batch_s": drawn - checked, "next_batch_s": again - drawn,
            "chunk_reads_open": opened_reads, "rss_main_mb": rss, "worker_peak_mb": max(worker_rss),
            "train_samples": len(indices), "info_s": info - started, "listing_s": listed - info if listing else None}


def _idle() -> float:
    import torch  # noqa: F401 - what every spawned loader worker holds before it gets its dataset
    return peak_rss_mb()


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--samples", type=int, help="samples in the store (default: ImageNet-1k's 1,281,167)")
    p.add_argument("--read", type=int, help="samples with targets and a JPEG, read by the loader")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="spawned loader workers")
    p.add_argument("--no-listing", action="store_true", help="skip timing verify's listing (8 min at 100M here)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    store = Path(args.work) / "stores" / f"scale-{args.samples}.zarr"
    images = Path(args.work) / f"scale-images-{args.samples}"
    started = time.perf_counter()
    members = write_images(images, args.samples, args.read)
    write_store(store, images, args.samples, args.read, members)
    setup_s = time.perf_counter() - started
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        idle = pool.submit(_idle).result()
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        row = pool.submit(measure, str(store), args.read, args.batch_size, args.workers, not args.no_listing).result()
    row = {"samples": args.samples, **row, "rss_idle_worker_mb": idle, "rss_worker_mb": row["worker_peak_mb"] - idle}
    limits = LIMITS_100M if args.samples >= 10**8 else LIMITS
    row["met"] = all(row[k] <= v for k, v in limits.items()) if args.samples >= common.IMAGENET_TRAIN else None
    payload = common.meta(torch.device("cpu"), __file__, args.argv, store=str(store), views=VIEWS,
                          shard_size=SHARD_SIZE, workers=args.workers, setup_s=setup_s,
                          limits={k: f"<= {v:g}" for k, v in limits.items()})
    columns = [("samples", "samples", "d"), ("open_s", "open s", ".2f"), ("reader_s", "reader s", ".2f"),
               ("split_s", "split s", ".2f"), ("image_check_s", "image check s", ".2f"),
               ("chunk_reads_open", "chunks read", "d"), ("first_batch_s", "first batch s", ".2f"),
               ("next_batch_s", "next batch s", ".3f"),
               ("rss_main_mb", "main MB", ".0f"), ("rss_worker_mb", "worker MB above idle", ".0f"),
               ("rss_idle_worker_mb", "idle worker MB", ".0f"), ("info_s", "info s", ".2f"),
               ("listing_s", "verify's listing s", ".2f"), ("met", "targets met", "")]
    return common.report(payload, [row], columns, args.json_out,
                         title=f"radio-train before its first step, on a store of {args.samples:,} samples")


if __name__ == "__main__":
    main()
