"""`radio-cache build`: a Ray job that runs every teacher once over a dataset and writes the store.

The work unit is one shard of S samples. One `ShardWorker` actor per GPU (CPU actors when there is
none) loads all teachers once, decodes each image once for all of them, and writes its shard's
bytes itself; only shard ids and small stats travel through Ray. A shard is marked done per
teacher only after all its data is written, so rerunning the same command resumes, and a killed
actor is restarted by Ray with its in-flight shards retried.

Letters: S samples per shard, V views, R teacher resolution, h, w grid, C channels, D summary dims.
"""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import RadioDistillError
from . import codecs
from . import layout as L
from .dataset import UnreadableImage, load_rgb, scan_dataset
from .inspect import store_info
from .store import check_settings, create_store, done_shards, finalize_norm, open_array, open_store
from .teachers import TeacherSpec, build_teacher, check_spec, identity
from .views import crop_resize, view_boxes


PLACE_TIMEOUT = 300  # seconds the other actors get to start once the first one is ready


@dataclass(frozen=True)
class Storage:
    """How one teacher's targets are stored: codec per target, spatial pooling factor."""

    spatial: str = "int8"
    summary: str = "fp16"
    pool: int = 1


@dataclass(frozen=True)
class CacheConfig:
    data: Path
    out: Path
    teachers: tuple[TeacherSpec, ...]
    storage: dict[str, Storage] = field(default_factory=dict)  # by teacher name; default Storage()
    views: int = 1
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 64
    workers: int | None = None  # CPU-only runs; with GPUs there is one worker per GPU
    address: str | None = None
    overwrite: bool = False
    max_shards: int | None = None  # stop after this many new shards (a resumable partial build)
    pixels: int | None = None  # also store every view at this side, so training decodes no JPEG


def _validate(cfg: CacheConfig) -> None:
    names = [t.name for t in cfg.teachers]
    if not names:
        raise RadioDistillError("no teachers given; pass --teacher SPEC (repeatable) or --teachers tiny")
    if len(set(names)) != len(names):
        raise RadioDistillError(f"teacher names must be unique, got {names}; name them like clip336=clip:...")
    for name, st in cfg.storage.items():
        if name not in names:
            raise RadioDistillError(f"storage settings for unknown teacher '{name}'; teachers: {', '.join(names)}")
        for codec in (st.spatial, st.summary):
            if codec not in L.CODECS:
                raise RadioDistillError(f"teacher '{name}': unknown codec '{codec}'; choose from {', '.join(L.CODECS)}")
        if st.pool < 1:
            raise RadioDistillError(f"teacher '{name}': pool factor must be >= 1, got {st.pool}")
    if cfg.views < 1 or cfg.shard_size < 1 or cfg.batch_size < 1 or (cfg.pixels is not None and cfg.pixels < 1):
        raise RadioDistillError("--views, --shard-size, --batch-size and --pixels must be >= 1")
    for spec in cfg.teachers:
        check_spec(spec)


def build_cache(cfg: CacheConfig, *, progress: bool = True) -> dict:
    """Build (or resume) a store. Returns the report shown at the end of `radio-cache build`."""
    import ray

    _validate(cfg)
    manifest = scan_dataset(cfg.data)
    storage = {t.name: asdict(cfg.storage.get(t.name, Storage())) for t in cfg.teachers}
    settings = {"teachers": {t.name: identity(t) for t in cfg.teachers}, "storage": storage, "pixels": cfg.pixels,
                "views": cfg.views, "seed": cfg.seed, "shard_size": cfg.shard_size,
                "dataset": manifest.fingerprint(), "num_samples": len(manifest)}
    out = Path(cfg.out).expanduser().resolve()
    empty = not out.exists() or (out.is_dir() and not any(out.iterdir()))  # e.g. a new mkdir
    if cfg.overwrite and not empty:
        open_store(out)  # --overwrite only ever deletes a radio-distill store, never another folder
    fresh = cfg.overwrite or empty
    if not fresh:
        check_settings(open_store(out), settings, out)

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, logging_level="ERROR", log_to_driver=True)
    gpus, total_cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 1))
    n_workers = gpus or min(cfg.workers or 1, max(1, total_cpus))  # an actor that cannot be placed would hang the build
    cpus = max(1, total_cpus // n_workers)
    if gpus:  # the CPUs beside each GPU on the leanest GPU node, so every GPU's actor can be placed
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        cpus = max(1, min(int(r.get("CPU", 0) // r["GPU"]) for r in nodes))
    # two shards per actor at once: one decodes or writes while the other computes
    actor = ray.remote(ShardWorker).options(num_gpus=1 if gpus else 0, num_cpus=cpus, max_concurrency=2,
                                            max_restarts=3, max_task_retries=3)
    workers = [actor.remote(cfg.teachers, str(out), batch_size=cfg.batch_size, threads=cpus) for _ in range(n_workers)]
    infos, workers = _start(workers)
    root = create_store(out, manifest=manifest, settings=settings, infos=infos) if fresh else open_store(out)

    names = [t.name for t in cfg.teachers]
    todo = [int(k) for k in np.flatnonzero(~done_shards(root, names))]
    if cfg.max_shards is not None:
        todo = todo[:cfg.max_shards]
    started = time.perf_counter()
    results = _run_shards(workers, todo, len(manifest), cfg.shard_size, progress=progress)
    wall = time.perf_counter() - started
    for w in workers:
        ray.kill(w)
    complete = bool(done_shards(root, names).all())
    if complete:
        finalize_norm(open_store(out, mode="r+"))
    return _report(out, results, wall, complete)


def _start(workers: list) -> tuple[dict, list]:
    """Wait until the actors have loaded their teachers; go on without any the cluster cannot place
    within PLACE_TIMEOUT of the first one being ready (they would otherwise hold shards forever)."""
    import ray

    calls = {w.describe.remote(): w for w in workers}
    [first], _ = ray.wait(list(calls), num_returns=1)
    ready, late = ray.wait(list(calls), num_returns=len(calls), timeout=PLACE_TIMEOUT)
    for ref in late:
        ray.kill(calls[ref])
    if late:
        print(f"warning: {len(late)} of {len(calls)} Ray workers could not start; building with {len(ready)}",
              file=sys.stderr)
    return ray.get(first), [calls[ref] for ref in ready]


def _run_shards(workers, shards: list[int], n: int, size: int, *, progress: bool) -> list[dict]:
    """Feed shards to workers, two in flight each so decode never waits for dispatch."""
    import ray
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    queue, results, inflight = list(shards), [], {}
    images = sum(L.shard_rows(k, size, n).stop - L.shard_rows(k, size, n).start for k in shards)
    columns = (TextColumn("[bold]caching"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("build", total=images)
        for w in workers:
            for _ in range(2):
                if queue:
                    inflight[w.run.remote(queue.pop(0))] = w
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            w = inflight.pop(ref)
            result = ray.get(ref)
            results.append(result)
            bar.advance(task, result["images"])
            if queue:
                inflight[w.run.remote(queue.pop(0))] = w
    return results


def _report(out: Path, results: list[dict], wall: float, complete: bool) -> dict:
    info = store_info(out)
    done_images = sum(r["images"] for r in results)
    teachers = {}
    for name, t in info["teachers"].items():
        seconds = sum(r["seconds"][name] for r in results)
        views_done = sum(r["views"] for r in results)
        teachers[name] = {"views_per_s": views_done / seconds if seconds else None,
                          "bytes_per_view": t["bytes_per_view"], "fidelity": t["fidelity"]}
    return {"store": str(out), "complete": complete, "samples": info["samples"], "views": info["views"],
            "shards_run": len(results), "images_run": done_images, "seconds": wall,
            "images_per_s": done_images / wall if wall else None, "teachers": teachers,
            "unreadable": info["unreadable"]}


class ShardWorker:
    """A Ray actor holding every teacher on one device; `run(shard)` computes and writes one shard."""

    def __init__(self, specs: tuple[TeacherSpec, ...], store: str, *, batch_size: int, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teachers = {s.name: build_teacher(s, device=self.device) for s in specs}
        self.store, self.batch_size = Path(store), batch_size
        self.pool = ThreadPoolExecutor(max(4, threads * 2))  # PIL decode/resize release the GIL
        self.device_lock = threading.Lock()  # two shards in flight share the device: decode/write overlap, compute does not
        self._arrays = {}

    def describe(self) -> dict:
        return {name: t.info() for name, t in self.teachers.items()}

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = open_array(self.store, name)
        return self._arrays[name]

    def run(self, shard: int) -> dict:
        root = open_store(self.store, mode="r+")
        n, views, seed, size = (root.attrs[k] for k in ("num_samples", "views", "seed", "shard_size"))
        rows = L.shard_rows(shard, size, n)
        data_root = Path(root.attrs["dataset"]["root"])
        min_side = max(t.resolution for t in self.teachers.values())
        ids = [str(i) for i in root[L.IDS][rows]]
        decoded = list(self.pool.map(lambda i: _decode(data_root / i, min_side), ids))

        count = len(ids)
        boxes = np.zeros((count, views, 4), np.float32)
        status = np.full(count, L.OK, np.uint8)
        errors = np.full(count, "", dtype=object)
        for k, (sample_id, d) in enumerate(zip(ids, decoded)):
            if isinstance(d, str):
                status[k], errors[k] = L.UNREADABLE, d
            else:
                boxes[k] = view_boxes(d[2], d[3], views=views, seed=seed, sample_id=sample_id)
        pairs = [(k, v) for k in np.flatnonzero(status == L.OK) for v in range(views)]

        seconds, writes = {}, []
        stat_shards = L.stat_shards(L.shard_count(n, size))
        stats = shard in stat_shards
        for name, teacher in self.teachers.items():
            storage = root.attrs["settings"]["storage"][name]
            targets = self._run_teacher(teacher, decoded, boxes, pairs, count, views, storage, shard, stats)
            seconds[name] = targets["seconds"]
            writes.append((name, targets))

        root[L.BOXES][rows] = boxes
        root[L.STATUS][rows] = status
        root[L.ERRORS][rows] = errors
        side = root.attrs["settings"]["pixels"]
        if side:  # the student's view pixels, resized once here instead of every epoch
            pixels = np.zeros((count, views, side, side, 3), np.uint8)
            crops = self.pool.map(lambda p: crop_resize(decoded[p[0]][0], boxes[p[0], p[1]], side,
                                                        span=decoded[p[0]][1]), pairs)
            for (k, v), crop in zip(pairs, crops):
                pixels[k, v] = crop
            self._array(L.PIXELS)[rows].write(pixels).result()
        for name, targets in writes:
            futures = [self._array(path)[rows].write(value) for path, value in targets["arrays"].items()]
            for f in futures:
                f.result()
            if stats:
                for path, value in targets["moments"].items():
                    root[path][stat_shards.index(shard)] = value
            if shard == 0:
                root[L.teacher_group(name)].attrs["fidelity"] = targets["fidelity"]
        for name in self.teachers:  # only now is the shard done, teacher by teacher
            root[L.done_array(name)][shard] = 1
        return {"shard": shard, "images": count, "views": len(pairs), "seconds": seconds,
                "unreadable": int((status == L.UNREADABLE).sum())}

    def _run_teacher(self, teacher, decoded, boxes, pairs, count, views, storage, shard, stats) -> dict:
        """Forward every (sample, view) of a shard through one teacher; encode into shard arrays.

        `stats`: accumulate the normalisation moments (statistics shards only). The returned
        `seconds` time the forward + encode, not the CPU resizing that overlaps it."""
        name, res = teacher.spec.name, teacher.resolution
        mean = torch.tensor(teacher.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(teacher.std, device=self.device).view(1, 3, 1, 1)
        out, moments, fid = {}, {}, {}
        def crop(p):
            return crop_resize(decoded[p[0]][0], boxes[p[0], p[1]], res, span=decoded[p[0]][1])

        batches = [pairs[b:b + self.batch_size] for b in range(0, len(pairs), self.batch_size)]
        pending = [self.pool.submit(crop, p) for p in batches[0]] if batches else []
        seconds = 0.0
        for i, batch in enumerate(batches):
            pixels = np.stack([f.result() for f in pending])
            if i + 1 < len(batches):  # resize the next batch on CPU threads while this one runs
                pending = [self.pool.submit(crop, p) for p in batches[i + 1]]
            with self.device_lock:  # the other shard in flight waits here, so seconds are this teacher's own
                started = time.perf_counter()
                x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
                x = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
                with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                    summary, spatial = teacher(x)
                raw = {"summary": summary, "spatial": spatial}
                for target, value in raw.items():
                    if value is None:
                        continue
                    stored = codecs.pool(value, storage["pool"]) if target == "spatial" else value
                    values, scale = codecs.encode(stored, storage[target])
                    decoded_value = codecs.decode(values, scale)
                    if stats:
                        _accumulate(moments, target, decoded_value)
                    if shard == 0:  # fidelity: what is stored, back at the teacher's grid, vs the raw output
                        back = codecs.unpool(decoded_value, value.shape[1:3]) if target == "spatial" else decoded_value
                        _accumulate_fidelity(fid, target, codecs.token_cosine(value, back))
                    ks, vs = (list(c) for c in zip(*batch))
                    for path, arr in ((L.target_array(name, target), values), (L.scale_array(name, target), scale)):
                        if arr is None:
                            continue
                        host = arr.cpu().numpy()
                        if path not in out:
                            out[path] = np.zeros((count, views, *host.shape[1:]), dtype=host.dtype)
                        out[path][ks, vs] = host
                seconds += time.perf_counter() - started
        moment_arrays = {L.moment_array(name, t, m): v for t, ms in moments.items() for m, v in ms.items()}
        fidelity = {t: {"mean_cos": f["sum"] / f["n"], "min_cos": f["min"]} for t, f in fid.items()}
        return {"arrays": out, "moments": moment_arrays, "fidelity": fidelity, "seconds": seconds}


def _decode(path: Path, min_side: int):
    """(image, span, width, height) in source pixels (see `load_rgb`), or the reason it is unreadable."""
    try:
        image, span, (width, height) = load_rgb(path, min_side=min_side)
    except UnreadableImage as e:
        return str(e)
    return image, span, width, height


def _accumulate(moments: dict, target: str, x: torch.Tensor) -> None:
    """Add count, sum and gram of the tokens of (..., C) `x` in float64."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    m = moments.setdefault(target, {"count": 0, "sum": 0.0, "gram": 0.0})
    m["count"] += tokens.shape[0]
    m["sum"] = m["sum"] + tokens.sum(0).cpu().numpy()
    m["gram"] = m["gram"] + (tokens.T @ tokens).cpu().numpy()


def _accumulate_fidelity(fid: dict, target: str, cos: torch.Tensor) -> None:
    f = fid.setdefault(target, {"sum": 0.0, "n": 0, "min": 1.0})
    f["sum"] += float(cos.sum())
    f["n"] += cos.numel()
    f["min"] = min(f["min"], float(cos.min()))
