"""`radio-cache build`: a Ray job that runs every teacher once over a dataset and writes the store.

The work unit is one shard of S samples. One `ShardWorker` actor per GPU (CPU actors when there is
none) loads all teachers once, decodes each image once for all of them, and writes its shard's
bytes itself; only shard ids and small stats travel through Ray. A shard is marked done per
teacher only after all its data is written, so rerunning the same command resumes, and a killed
actor is restarted by Ray with its in-flight shards retried. A shard that still fails is reported
with its cause while the others go on. A rerun reads the images where it is told they are now, and
also redoes the samples of done shards whose files were missing (`retryable`), and whole done shards
holding an image that changed since it was cached, or a store file that was lost (`provenance.py`).

Letters: S samples per shard, V views, R teacher resolution, h, w grid, C channels, D summary dims.
"""

import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._ray import check_address
from ..errors import CacheIntegrityError, RadioDistillError
from ..ops import autocast, normalise
from ..progress import Progress
from . import calibrate, codecs, provenance
from . import layout as L
from .dataset import UnreadableImage, load_rgb
from .inspect import store_info
from .location import Location, location, s3_environment
from .lock import build_lock, check_token
from .sources import Images, scan_source
from .store import (check_settings, create_store, done_shards, finalize_norm, open_array, open_store,
                    resume_store, shard_key, teacher_names)
from .teachers import TeacherSpec, build_teacher, check_spec, grid, identity
from .views import crop_resize, view_boxes


START_TIMEOUT = 900  # seconds the first actor gets to be placed and load its teachers (big weights, slow disks)
PLACE_TIMEOUT = 300  # seconds the other actors get to start once the first one is ready
MOMENTS = ("count", "sum", "gram", "fidelity")  # per statistics shard (`layout.moment_array`)


@dataclass(frozen=True)
class Storage:
    """How one teacher's targets are stored: codec per target, spatial pooling factor. With a `fidelity`
    budget (a mean token cosine) the codecs are 'auto': the calibration pass picks them per target."""

    spatial: str = "int8"
    summary: str = "fp16"
    pool: int = 1
    fidelity: float | None = None

    def settings(self) -> dict:
        """As recorded in the store's settings (no fidelity key without a budget, as before budgets)."""
        return {k: v for k, v in asdict(self).items() if k != "fidelity" or v is not None}


@dataclass(frozen=True)
class CacheConfig:
    data: Path
    out: str | Path  # a folder or an s3:// URL (`location.py`)
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
        if st.fidelity is not None and not 0 < st.fidelity < 1:
            raise RadioDistillError(f"teacher '{name}': --fidelity must be a mean cosine in (0, 1), e.g. 0.99, "
                                    f"got {st.fidelity}")
        for codec in (st.spatial, st.summary):
            if codec not in (*L.CODECS, "auto"):
                raise RadioDistillError(f"teacher '{name}': unknown codec '{codec}'; choose from {', '.join(L.CODECS)}")
            if (codec == "auto") != (st.fidelity is not None):
                raise RadioDistillError(f"teacher '{name}': codec '{codec}' {'with' if st.fidelity else 'without'} a "
                                        "fidelity budget; a budget picks the codecs ('auto'), else name them")
        if st.pool < 1:
            raise RadioDistillError(f"teacher '{name}': pool factor must be >= 1, got {st.pool}")
    for option, value in (("--views", cfg.views), ("--shard-size", cfg.shard_size), ("--batch-size", cfg.batch_size),
                          ("--pixels", cfg.pixels), ("--workers", cfg.workers), ("--max-shards", cfg.max_shards)):
        if value is not None and value < 1:
            raise RadioDistillError(f"{option} must be >= 1, got {value}")
    if cfg.seed < 0:  # numpy's seed sequence takes no negative numbers
        raise RadioDistillError(f"--seed must be >= 0, got {cfg.seed}")
    for spec in cfg.teachers:
        check_spec(spec)
        pool = cfg.storage.get(spec.name, Storage()).pool
        h, w = grid(spec) if pool > 1 else (pool, pool)
        if h % pool or w % pool:  # avg_pool2d would drop the last rows and columns without a word
            divisors = [str(f) for f in range(2, min(h, w) + 1) if h % f == 0 == w % f]
            raise RadioDistillError(f"teacher '{spec.name}': pool factor {pool} does not divide its {h}x{w} grid; "
                                    + (f"choose from {', '.join(divisors)}" if divisors else "it cannot be pooled"))
    check_address(cfg.address)


def build_cache(cfg: CacheConfig, *, progress: bool = True) -> dict:
    """Build (or resume) a store. Returns the report shown at the end of `radio-cache build`."""
    import ray

    _validate(cfg)
    manifest = scan_source(cfg.data)
    storage = {t.name: cfg.storage.get(t.name, Storage()).settings() for t in cfg.teachers}
    settings = {"teachers": {t.name: identity(t) for t in cfg.teachers}, "storage": storage, "pixels": cfg.pixels,
                "views": cfg.views, "seed": cfg.seed, "shard_size": cfg.shard_size,
                "dataset": manifest.fingerprint(), "num_samples": len(manifest)}
    out = location(cfg.out)
    # one build per store; a folder that is not a store is refused (and never deleted by --overwrite)
    with build_lock(out) as token:
        fresh = cfg.overwrite or not out.exists("zarr.json")  # nothing, or a creation that was stopped
        names = [t.name for t in cfg.teachers]
        if not fresh:  # the stored calibration is reused: the codecs of done shards must not change
            check_settings(open_store(out), settings, out)
            root = resume_store(out, manifest)
            if root.attrs["dataset"]["root"] != str(manifest.root):  # the same samples (checked above), moved here
                root.attrs["dataset"] = {**root.attrs["dataset"], "root": str(manifest.root)}
            _redo_changed(out, root, manifest, names)
        todo = None if fresh else _todo(root, names, cfg.shard_size)[:cfg.max_shards]
        results, failed, wall = [], {}, 0.0
        if todo != []:  # a complete store starts no teacher
            workers, infos = _workers(cfg, out)
            if fresh:
                calibration = _calibrate(workers[0], manifest, settings=settings)
                root = create_store(out, manifest=manifest, settings=settings, infos=infos, calibration=calibration)
                todo = _todo(root, names, cfg.shard_size)[:cfg.max_shards]
            started = time.perf_counter()
            results, failed = _run_shards(workers, todo, len(manifest), cfg.shard_size, data_root=str(manifest.root),
                                          token=token, progress=progress)
            wall = time.perf_counter() - started
            for w in workers:
                ray.kill(w)
        complete = bool(done_shards(root, names).all())
        if complete:
            root = open_store(out, mode="r+")
            finalize_norm(root)
            _finalize_fidelity(root)
        return _report(out, results, failed, wall, complete, calibrated=fresh)


def _workers(cfg: CacheConfig, out: Location) -> tuple[list, dict]:
    """Start the Ray actors (one per GPU, else --workers), each holding every teacher; (actors that
    started, what the teachers produce)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=cfg.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    gpus, total_cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 1))
    n_workers = gpus or min(cfg.workers or 1, max(1, total_cpus))  # an actor that cannot be placed would hang the build
    cpus = max(1, total_cpus // n_workers)
    if gpus:  # the CPUs beside each GPU on the leanest GPU node, so every GPU's actor can be placed
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
        cpus = max(1, min(int(r.get("CPU", 0) // r["GPU"]) for r in nodes))
    # two shards per actor at once: one decodes or writes while the other computes
    env = {"runtime_env": {"env_vars": s3_environment()}} if out.remote else {}  # actors on other nodes too
    actor = ray.remote(ShardWorker).options(num_gpus=1 if gpus else 0, num_cpus=cpus, max_concurrency=2,
                                            max_restarts=3, max_task_retries=3, **env)
    workers = [actor.remote(cfg.teachers, str(out), batch_size=cfg.batch_size, threads=cpus) for _ in range(n_workers)]
    infos, workers = _start(workers)
    return workers, infos


def _calibrate(worker, manifest, *, settings: dict) -> dict | None:
    """Run the calibration pass of the teachers with a fidelity budget on one worker (None when none has one).

    Its arrays come back through Ray, once per build (tens of MB for the largest teachers): the store's
    target arrays cannot be created before their codecs are chosen.

    Raises:
        RadioDistillError: the calibration failed (its one-line cause), or too few calibration images read.
    """
    import ray

    budgets = {name: st for name, st in settings["storage"].items() if st.get("fidelity") is not None}
    if not budgets:
        return None
    rows = L.calibration_rows(len(manifest))
    locations = None if manifest.locations is None else manifest.locations[rows]
    try:
        result = ray.get(worker.calibrate.options(max_task_retries=0).remote(
            rows, [manifest.ids[r] for r in rows], locations, manifest.source(), budgets, settings["seed"]))
    except ray.exceptions.RayError as e:
        raise RadioDistillError(f"calibration failed: {_cause(e)}") from None
    for name, targets in result["teachers"].items():
        for target, c in targets.items():
            if not c["met"]:  # pooling alone costs more: the most faithful codec is used
                print(f"warning: teacher '{name}' {target}: no codec meets --fidelity {c['budget']} (best {c['codec']}, "
                      f"held-back mean cos {c['cos_mean']:.5f}); using it. Less pooling may help", file=sys.stderr)
    return result


def retryable(reason: str) -> bool:
    """Whether an unreadable sample may read on a rerun: its file was missing (not there yet, or looked
    for at the dataset's old place), or the OS failed to read it (an `[Errno N]` I/O error, not the image)."""
    return reason == "missing file" or "[Errno " in reason


def _redo_changed(out: Location, root, manifest, names: list[str]) -> None:
    """Clear the done flags of done shards holding an image that is no longer the bytes its targets were
    computed from (replaced under the same name), so the build redoes them whole. Stats every image file
    (tars, Parquet: every file) and reads those whose mtime moved."""
    if L.SOURCES not in root:  # before layout v4 nothing was recorded
        return
    n, size = root.attrs["num_samples"], root.attrs["shard_size"]
    done = done_shards(root, names)
    recorded = open_array(out, L.SOURCES).read().result()
    rows = np.flatnonzero(np.repeat(done, size)[:n] & (recorded[:, 0] > 0))
    if not rows.size:
        return
    locations = None if manifest.locations is None else manifest.locations[rows]
    mask = provenance.changed(Images(root.attrs["dataset"], manifest.root), [manifest.ids[r] for r in rows.tolist()],
                              locations, recorded[rows])
    changed = rows[mask]
    if not changed.size:
        return
    shards = sorted({int(r) // size for r in changed})
    print(f"warning: {changed.size} images changed since they were cached (e.g. '{manifest.ids[int(changed[0])]}'); "
          f"redoing their {len(shards)} shards", file=sys.stderr)
    for name in names:
        for k in shards:
            root[L.done_array(name)][k] = 0


def _todo(root, names: list[str], size: int) -> list[int]:
    """Shards to run: those not done, then done ones holding samples a rerun may now read."""
    done = done_shards(root, names)
    bad = np.flatnonzero(root[L.STATUS][:] == L.UNREADABLE)
    reasons = root[L.ERRORS].get_coordinate_selection(bad) if bad.size else []
    again = {int(k) // size for k, reason in zip(bad, reasons) if retryable(str(reason))}
    return [int(k) for k in np.flatnonzero(~done)] + sorted(k for k in again if done[k])


def _start(workers: list) -> tuple[dict, list]:
    """Wait until the actors have loaded their teachers; go on without those that fail to start or are
    not up within PLACE_TIMEOUT of the first (they would otherwise hold shards forever).

    Raises:
        RadioDistillError: no actor is up within START_TIMEOUT (the cluster cannot place one, or loading
            hangs), or every actor failed to start (its one-line cause).
    """
    import ray

    # no retries: an actor whose __init__ raised would have its traceback printed by Ray for each retry
    calls = {w.describe.options(max_task_retries=0).remote(): w for w in workers}
    pending, infos, errors = list(calls), {}, []

    def collect(refs):
        for ref in refs:
            try:
                infos[ref] = ray.get(ref)
            except ray.exceptions.RayError as e:
                errors.append(_cause(e))

    deadline = time.monotonic() + START_TIMEOUT
    while pending and not infos and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        collect(ready)
    if infos and pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=PLACE_TIMEOUT)
        collect(ready)
    for ref in calls.keys() - infos.keys():
        ray.kill(calls[ref])
    if not infos:
        if errors:
            raise RadioDistillError(f"no Ray worker could start: {errors[0]}")
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise RadioDistillError(f"no Ray worker started within {START_TIMEOUT} s (free in the cluster now: {free}); "
                                "the cluster cannot place one, or loading the teachers hangs")
    if len(infos) < len(calls):
        why = f": {errors[0]}" if errors else " in time"
        print(f"warning: {len(calls) - len(infos)} of {len(calls)} Ray workers could not start{why}; "
              f"building with {len(infos)}", file=sys.stderr)
    return next(iter(infos.values())), [calls[ref] for ref in infos]


def _run_shards(workers, shards: list[int], n: int, size: int, *, data_root: str, token: str,
                progress: bool) -> tuple[list[dict], dict[int, str]]:
    """Feed shards to workers, two in flight each so decode never waits for dispatch.

    A shard that fails (its exception, or its actor dying past Ray's restarts) is recorded with its
    one-line cause and the others go on. Returns (results of the shards run, {shard: cause})."""
    import ray

    queue, results, failed, inflight = list(shards), [], {}, {}
    images = sum(L.shard_rows(k, size, n).stop - L.shard_rows(k, size, n).start for k in shards)

    def submit(worker):
        if queue:
            k = queue.pop(0)
            inflight[worker.run.remote(k, data_root, token)] = (worker, k)

    with Progress("caching", total=images, unit="images", enabled=progress) as bar:
        for w in workers:
            submit(w)
            submit(w)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            w, k = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                failed[k] = _cause(e)
                if isinstance(e, ray.exceptions.RayActorError):  # gone for good: Ray's restarts are spent
                    continue
            else:
                results.append(result)
                bar.advance(L.shard_rows(k, size, n).stop - L.shard_rows(k, size, n).start)
            submit(w)
    failed.update({k: "not run: no Ray worker left" for k in queue})
    return results, failed


def _cause(e: Exception) -> str:
    """One line saying why a Ray task or actor failed: the original exception, not Ray's traceback."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        text = f"{type(cause).__name__}: {cause}"
    else:  # e.g. an actor whose __init__ raised: only the traceback's text is left; its exception line
        found = re.findall(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.*)$", str(e), re.M)
        text = f"{found[-1][0]}: {found[-1][1]}" if found else str(e)
    text = re.sub(r"\s*\[source locations=.*?\]", "", " ".join(text.split()))  # tensorstore's C++ file:line list
    return text if len(text) <= 320 else f"{text[:160]} ... {text[-155:]}"  # the OS error is at the end


def _report(out: Location, results: list[dict], failed: dict[int, str], wall: float, complete: bool, *,
            calibrated: bool) -> dict:
    info = store_info(out)
    done_images = sum(r["images"] for r in results)
    teachers = {}
    for name, t in info["teachers"].items():
        seconds = sum(r["seconds"][name] for r in results)
        views_done = sum(r["views"] for r in results)
        teachers[name] = {"views_per_s": views_done / seconds if seconds else None,
                          "bytes_per_view": t["bytes_per_view"], "fidelity": t["fidelity"], "storage": t["storage"]}
    return {"store": str(out), "complete": complete, "samples": info["samples"], "views": info["views"],
            "calibration": info["calibration"] and {**info["calibration"], "ran": calibrated},
            "shards": info["shards_total"], "shards_run": len(results), "images_run": done_images, "seconds": wall,
            "images_per_s": done_images / wall if wall else None, "teachers": teachers, "ok": info["ok"],
            "unreadable": info["unreadable"], "retryable": sum(map(retryable, info["unreadable"].values())),
            "failed": dict(sorted(failed.items()))}


class ShardWorker:
    """A Ray actor holding every teacher on one device; `run(shard, ...)` computes and writes one shard."""

    def __init__(self, specs: tuple[TeacherSpec, ...], store: str, *, batch_size: int, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teachers = {s.name: build_teacher(s, device=self.device) for s in specs}
        self.store, self.batch_size = location(store), batch_size
        self.pool = ThreadPoolExecutor(max(4, threads * 2))  # PIL decode/resize release the GIL
        self.device_lock = threading.Lock()  # two shards in flight share the device: decode/write overlap, compute does not
        self._arrays, self._zarrs, self._transforms, self._root = {}, {}, {}, None

    def describe(self) -> dict:
        return {name: t.info() for name, t in self.teachers.items()}

    def _forward(self, teacher, pixels: np.ndarray) -> dict:
        """(B, R, R, 3) uint8 -> {'summary': (B, D) | None, 'spatial': (B, h, w, C)} on the device."""
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        x = normalise(x.permute(0, 3, 1, 2), teacher.mean, teacher.std)
        with torch.inference_mode(), autocast(self.device):
            summary, spatial = teacher(x)
        return {"summary": summary, "spatial": spatial}

    def calibrate(self, rows: np.ndarray, ids: list[str], locations: np.ndarray | None, source: dict, budgets: dict,
                  seed: int) -> dict:
        """Calibrate the codecs of the teachers in `budgets` ({name: storage settings with a fidelity}) on
        view 0 of the samples `rows` (`ids`, `locations` theirs; `source`: `Manifest.source`): per target,
        moments of the fit samples, a codec chosen on the held-back ones (`calibrate.choose`), then
        statistics and transforms of all of them.

        Returns:
            {'rows': (Q,) rows read, 'seconds', 'held', 'teachers': {name: {target: {'codec', 'budget',
            'cos_mean', 'cos_min', 'met', 'tried', 'arrays': {'mean': (C,), 'cov': (C, C), 'phis': (C, C),
            'basis': (C, k) or absent}}}}}
        """
        started = time.perf_counter()
        teachers = {name: self.teachers[name] for name in budgets}
        min_side = max(t.resolution for t in teachers.values())
        payloads = Images(source).read(ids, locations)
        decoded = [(r, d) for r, d in zip(rows, self.pool.map(lambda p: _decode(p, min_side), payloads))
                   if not isinstance(d, str)]  # an unreadable calibration sample is left out
        if len(decoded) < 2:
            raise RadioDistillError(f"calibration needs at least 2 readable images, {len(decoded)} of the "
                                    f"{len(rows)} calibration samples read")
        stride = max(2, -(-len(decoded) // L.CALIBRATION_HELD))
        held_back = np.arange(len(decoded)) % stride == 1
        boxes = [view_boxes(d[2], d[3], views=1, seed=seed, sample_id=str(r))[0] for r, d in decoded]  # view 0
        out = {}
        for name, teacher in teachers.items():
            pool = budgets[name]["pool"]
            fit, held = {}, {}
            for b in range(0, len(decoded), self.batch_size):
                batch = range(b, min(b + self.batch_size, len(decoded)))
                pixels = np.stack(list(self.pool.map(lambda i: crop_resize(decoded[i][1][0], boxes[i], teacher.resolution,
                                                                           span=decoded[i][1][1]), batch)))
                for target, value in self._forward(teacher, pixels).items():
                    if value is None:
                        continue
                    value = value.float()
                    stored = codecs.pool(value, pool) if target == "spatial" else value
                    mask = torch.from_numpy(held_back[batch.start:batch.stop]).to(value.device)
                    fit.setdefault(target, calibrate.Moments(value.shape[-1], value.device)).add(stored[~mask])
                    held.setdefault(target, []).append(value[mask])  # on the device: the candidates are measured there
            out[name] = {}
            for target, moments in fit.items():
                x = torch.cat(held[target])
                choice = calibrate.choose(moments.statistics(), x, budgets[name]["fidelity"], pool=pool)
                pooled = codecs.pool(x, pool) if x.dim() == 4 else x
                stats = moments.merged(calibrate.Moments(x.shape[-1], x.device).add(pooled)).statistics()
                arrays = {"mean": stats.mean.numpy(), "cov": stats.cov.numpy(),
                          "phis": calibrate.phis(stats).float().numpy()}
                basis = calibrate.basis(choice.codec, stats)
                if basis is not None:
                    arrays["basis"] = basis.numpy()
                out[name][target] = {"codec": choice.codec, "budget": budgets[name]["fidelity"], "met": choice.met,
                                     "cos_mean": choice.cos_mean, "cos_min": choice.cos_min, "tried": choice.tried,
                                     "arrays": arrays}
        return {"rows": np.array([r for r, _ in decoded], dtype=np.int64), "held": int(held_back.sum()),
                "seconds": time.perf_counter() - started, "teachers": out}

    def _transform(self, name: str, target: str, codec: str):
        """(mean (C,), basis (C, k)) float32 on the device of a calibrated codec, read from the store once; or None."""
        if codec in codecs.PLAIN:
            return None
        key = (name, target)
        if key not in self._transforms:
            read = [open_array(self.store, L.calib_array(name, target, a)).read() for a in ("mean", "basis")]
            mean, basis = (torch.from_numpy(np.asarray(r.result())).float().to(self.device) for r in read)
            self._transforms[key] = (mean, basis)
        return self._transforms[key]

    def _store(self):
        """The store, opened and checked once per actor (on S3 an open is some 45 requests); its arrays do not
        change while the build runs."""
        if self._root is None:
            self._root = open_store(self.store, mode="r+")
        return self._root

    def _zarr(self, name: str):
        """The store's array or group `name` through zarr, or None where the store has none: looked up once
        per actor, like the store (each lookup is a few requests on S3)."""
        if name not in self._zarrs:
            try:
                self._zarrs[name] = self._store()[name]
            except KeyError:
                self._zarrs[name] = None
        return self._zarrs[name]

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = open_array(self.store, name)
        return self._arrays[name]

    def _base(self, path: str, rows: slice, retry: bool) -> np.ndarray:
        """The values a shard's rows of an array start from: what is stored (a retry changes only
        some samples, so the others keep their bytes), or zeros."""
        arr = self._array(path)
        if retry:
            return arr[rows].read().result()
        return np.zeros((rows.stop - rows.start, *arr.shape[1:]), arr.dtype.numpy_dtype)

    def run(self, shard: int, data_root: str, token: str) -> dict:
        """Compute and write one shard, reading images under `data_root`. A shard already done is a
        retry: only its samples a rerun may now read (`retryable`) are redone, the others keep their
        bytes. `token` is the build's lock token: a build that no longer holds the store writes nothing."""
        check_token(self.store, token)
        root = self._store()
        n, views, seed, size = (root.attrs[k] for k in ("num_samples", "views", "seed", "shard_size"))
        rows = L.shard_rows(shard, size, n)
        count = rows.stop - rows.start
        ids = [str(i) for i in self._zarr(L.IDS)[rows]]
        if "" in ids:  # the fill value: the ids chunk is gone (a rerun writes it again from the scan)
            raise CacheIntegrityError(f"{L.IDS}: shard {shard}'s chunk is gone; rerun the same `radio-cache build`")
        locations = None if self._zarr(L.LOCATIONS) is None else self._zarr(L.LOCATIONS)[rows]
        recorded = self._zarr(L.SOURCES) is not None  # layout v4 on: what each target came from is recorded
        retry = all(self._zarr(L.done_array(name))[shard] == 1 for name in self.teachers)  # this shard's flags only
        if retry:
            boxes, status, errors = (self._zarr(a)[rows] for a in (L.BOXES, L.STATUS, L.ERRORS))
            errors = errors.astype(object)
            sources = self._zarr(L.SOURCES)[rows] if recorded else None
            redo = [k for k in range(count) if status[k] == L.UNREADABLE and retryable(str(errors[k]))]
            for name in self.teachers:  # not done while it changes: a kill now redoes it whole, never adds twice
                self._zarr(L.done_array(name))[shard] = 0
        else:  # the errors known from the scan (a tar key without an image) are kept
            boxes, errors = np.zeros((count, views, 4), np.float32), self._zarr(L.ERRORS)[rows].astype(object)
            status, redo = np.full(count, L.OK, np.uint8), list(range(count))
            sources = np.zeros((count, 3), np.int64)
        min_side = max(t.resolution for t in self.teachers.values())
        images = Images(root.attrs["dataset"], data_root)  # one read per tar span or Parquet row group, here
        wanted = ([ids[k] for k in redo], None if locations is None else locations[redo])
        payloads = images.read(*wanted)
        mtimes = provenance.source_stats(images, *wanted)[:, 1] if images.packed else np.zeros(len(redo), np.int64)
        scanned = [errors[k] for k in redo]
        read = list(self.pool.map(lambda p, m, why: _read_decode(p, m, min_side, why), payloads, mtimes, scanned))
        decoded = {k: d for k, (d, _) in zip(redo, read)}
        if recorded:
            sources[redo] = [r for _, r in read]
        for k, d in decoded.items():
            if isinstance(d, str):
                status[k], errors[k] = L.UNREADABLE, d
            else:
                status[k], errors[k] = L.OK, ""
                boxes[k] = view_boxes(d[2], d[3], views=views, seed=seed, sample_id=ids[k])
        pairs = [(k, v) for k in decoded if status[k] == L.OK for v in range(views)]

        seconds, arrays, moments = {}, {}, {}
        stat_shards = L.stat_shards(L.shard_count(n, size))
        stats = shard in stat_shards
        for name, teacher in self.teachers.items():
            storage = self._zarr(L.teacher_group(name)).attrs["storage"]  # the codecs chosen (a budget's, or the user's)
            out = {p: self._base(p, rows, retry) for t in L.TARGETS
                   for p in (L.target_array(name, t), L.scale_array(name, t)) if self._zarr(p) is not None}
            seconds[name], found = self._run_teacher(teacher, decoded, boxes, pairs, out, storage, stats)
            arrays.update(out)
            moments.update(found)
        side = root.attrs["settings"]["pixels"]
        if side:  # the student's view pixels, resized once here instead of every epoch
            arrays[L.PIXELS] = self._base(L.PIXELS, rows, retry)
            crops = self.pool.map(lambda p: crop_resize(decoded[p[0]][0], boxes[p[0], p[1]], side,
                                                        span=decoded[p[0]][1]), pairs)
            for (k, v), crop in zip(pairs, crops):
                arrays[L.PIXELS][k, v] = crop

        check_token(self.store, token)
        futures = [self._array(path)[rows].write(value) for path, value in arrays.items()]
        for f in futures:
            f.result()
        written = {L.BOXES: boxes, L.STATUS: status, L.ERRORS: errors, **({L.SOURCES: sources} if recorded else {})}
        for a, value in written.items():
            self._zarr(a)[rows] = value
        if stats:  # every row is written, zeros included: a rerun of the shard replaces what a killed one left
            row = stat_shards.index(shard)
            for name in self.teachers:
                for path, moment in ((L.moment_array(name, t, m), m) for t in L.TARGETS for m in MOMENTS):
                    array = self._zarr(path)
                    if array is not None:
                        new = moments.get(path, np.zeros(array.shape[1:]))
                        written[path] = _merge(moment, array[row], new) if retry else new
                        array[row] = written[path]
        check_token(self.store, token)
        if recorded:
            self._record(shard, {**arrays, **written, L.IDS: np.asarray(ids, dtype=object),
                                 L.LABELS: self._zarr(L.LABELS)[rows], L.LOCATIONS: locations})
        for name in self.teachers:  # only now is the shard done, teacher by teacher
            self._zarr(L.done_array(name))[shard] = 1
        return {"shard": shard, "images": len(redo), "views": len(pairs), "seconds": seconds,
                "unreadable": int(sum(status[k] == L.UNREADABLE for k in redo))}

    def _record(self, shard: int, values: dict) -> None:
        """Write shard `shard`'s row of the integrity record: per array its file's size and the digest of the
        values it holds (`values`, by array), as a later reader will find them (`provenance.py`)."""
        record = self._zarr(L.SHARDS)
        files = record.attrs["arrays"]
        row = np.zeros((len(files), 2), np.int64)
        for j, array in enumerate(files):
            key = shard_key(self._zarr(array).metadata, array, shard, record.shape[0])
            if key is not None:
                value = np.asarray(values[array], dtype=None if array in (L.IDS, L.ERRORS) else self._zarr(array).dtype)
                row[j] = self.store.file_size(f"{array}/{key}"), provenance.values_digest(value)
        record[shard] = row

    def _run_teacher(self, teacher, decoded, boxes, pairs, out, storage, stats) -> tuple[float, dict]:
        """Forward (sample, view) `pairs` through one teacher; encode them into the shard's arrays `out`
        ({path: (S, V, ...)}, filled in place).

        `stats`: accumulate the normalisation moments and the codec's fidelity (statistics shards only).
        Returns (seconds of forward + encode, not the CPU resizing that overlaps it; {moment array: row})."""
        name, res = teacher.spec.name, teacher.resolution
        moments = {}
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
                for target, value in self._forward(teacher, pixels).items():
                    if value is None:
                        continue
                    stored = codecs.pool(value, storage["pool"]) if target == "spatial" else value
                    transform = self._transform(name, target, storage[target])
                    values, scale = codecs.encode(stored, storage[target], transform)
                    decoded_value = codecs.decode(values, scale, transform)
                    if stats:  # fidelity: what is stored, back at the teacher's grid, vs the raw output
                        back = codecs.unpool(decoded_value, value.shape[1:3]) if target == "spatial" else decoded_value
                        _accumulate(moments, target, decoded_value, codecs.token_cosine(value, back))
                    ks, vs = (list(c) for c in zip(*batch))
                    for path, arr in ((L.target_array(name, target), values), (L.scale_array(name, target), scale)):
                        if arr is not None:
                            out[path][ks, vs] = arr.cpu().numpy()
                seconds += time.perf_counter() - started
        return seconds, {L.moment_array(name, t, m): v for t, ms in moments.items() for m, v in ms.items()}


def _read_decode(payload, mtime: int, min_side: int, scanned: str):
    """(`_decode` of the image, its source record (size, mtime_ns, digest)): its bytes read once (`provenance`)."""
    data, record = provenance.read_image(payload, int(mtime)) if payload is not None else (None, (0, 0, 0))
    return _decode(data, min_side, scanned), record


def _decode(payload, min_side: int, scanned: str = ""):
    """(image, span, width, height) in source pixels (see `load_rgb`), or the reason it is unreadable.

    `payload`: what `Images.read` gave (None: the scan found no image, `scanned` says why)."""
    if payload is None:
        return str(scanned)
    if isinstance(payload, UnreadableImage):
        return str(payload)
    try:
        image, span, (width, height) = load_rgb(payload, min_side=min_side)
    except UnreadableImage as e:
        return str(e)
    return image, span, width, height


def _accumulate(moments: dict, target: str, x: torch.Tensor, cos: torch.Tensor) -> None:
    """Add count, sum and gram of the tokens of (..., C) `x` in float64, and [sum, count, min] of
    their (T,) cosines `cos` to the unencoded output."""
    tokens = x.reshape(-1, x.shape[-1]).double()
    m = moments.setdefault(target, {"count": 0, "sum": 0.0, "gram": 0.0, "fidelity": np.zeros(3)})
    m["count"] += tokens.shape[0]
    m["sum"] = m["sum"] + tokens.sum(0).cpu().numpy()
    m["gram"] = m["gram"] + (tokens.T @ tokens).cpu().numpy()
    m["fidelity"] = _merge("fidelity", m["fidelity"], np.array([float(cos.sum()), cos.numel(), float(cos.min())]))


def _merge(moment: str, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two statistics rows of one shard added up; a fidelity row is [sum, count, min] of cosines."""
    if moment != "fidelity" or old[1] == 0 or new[1] == 0:  # an empty fidelity row is zeros: the sum is the other
        return old + new
    return np.array([old[0] + new[0], old[1] + new[1], min(old[2], new[2])])


def _finalize_fidelity(root) -> None:
    """Record each teacher's fidelity from the statistics shards (spread over the dataset): the mean
    cosine over all their tokens and the worst token, per target."""
    for name in teacher_names(root):
        fidelity = {}
        for target in L.TARGETS:
            path = L.moment_array(name, target, "fidelity")
            rows = root[path][:] if path in root else np.zeros((0, 3))
            rows = rows[rows[:, 1] > 0]
            if len(rows):
                fidelity[target] = {"mean_cos": float(rows[:, 0].sum() / rows[:, 1].sum()),
                                    "min_cos": float(rows[:, 2].min()), "shards": len(rows)}
        root[L.teacher_group(name)].attrs["fidelity"] = fidelity
