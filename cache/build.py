"""`radio-cache build`: a Ray job that runs every teacher once over a dataset and writes the store.

The work unit is one shard of S samples. One `ShardWorker` actor (`worker.py`) per GPU (CPU actors when
there is none) loads all teachers once, decodes each image once for all of them, and writes its shard's
bytes itself; only the shard's ids, its status and its integrity record travel through Ray. The driver
alone writes the done state (`group.commit_shards`, every COMMIT_EVERY seconds): a shard is done only
after all its data is written, so rerunning the same command resumes, reading a few objects however
many shards there are, and a killed actor is restarted by Ray with its in-flight shards retried. A shard that still fails is reported
with its cause while the others go on. A rerun reads the images where it is told they are now, and
also redoes the samples of done shards whose files were missing (`retryable`), and whole done shards
holding an image that changed since it was cached, or a store file that was lost (`provenance.py`).

Letters: S samples per shard, V views, R teacher resolution, h, w grid, C channels, D summary dims.
"""

import sys
import time

import numpy as np

from .._ray import check_address, error_line
from ..errors import RadioDistillError
from ..ops import autocast_environment
from ..progress import Progress
from ..store import layout as L
from ..store import provenance
from ..store.group import (check_settings, commit_shards, create_store, done_shards, finalize_norm, open_array,
                           open_store, read_rows, resume_store, teacher_names)
from ..store.inspect import store_info
from ..store.location import Location, location, s3_environment
from ..store.lock import build_lock
from ..store.sources import Images, scan_source
from .config import CacheConfig, Storage
from .teachers import check_spec, check_weights_reachable, grid, identity, weight_files
from .worker import ShardWorker, retryable

START_TIMEOUT = 900  # seconds the first actor gets to be placed and load its teachers (big weights, slow disks)
PLACE_TIMEOUT = 300  # seconds the other actors get to start once the first one is ready
COMMIT_EVERY = 2.0  # seconds between commits of the done state: a kill redoes at most this much finished work
UNAVAILABLE_TRIES = 3  # sends of a shard to actors found unreachable (Ray gave up its retries) before it is failed


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
                          ("--pixels", cfg.pixels), ("--workers", cfg.workers), ("--max-shards", cfg.max_shards),
                          ("--tar-samples", cfg.tar_samples)):
        if value is not None and value < 1:
            raise RadioDistillError(f"{option} must be >= 1, got {value}")
    if cfg.seed < 0:  # numpy's seed sequence takes no negative numbers
        raise RadioDistillError(f"--seed must be >= 0, got {cfg.seed}")
    for spec in cfg.teachers:
        check_spec(spec)
        pool = cfg.storage.get(spec.name, Storage()).pool
        h, w = grid(spec)  # the architecture on the meta device: a side that is no multiple of its patch fails here
        if h % pool or w % pool:  # avg_pool2d would drop the last rows and columns without a word
            divisors = [str(f) for f in range(2, min(h, w) + 1) if h % f == 0 == w % f]
            raise RadioDistillError(f"teacher '{spec.name}': pool factor {pool} does not divide its {h}x{w} grid; "
                                    + (f"choose from {', '.join(divisors)}" if divisors else "it cannot be pooled"))
    check_address(cfg.address)
    for spec in cfg.teachers:  # last, the one check that may ask the network: a tag's weights cached or reachable
        check_weights_reachable(spec)


def build_cache(cfg: CacheConfig, *, progress: bool = True) -> dict:
    """Build (or resume) a store. Returns the report shown at the end of `radio-cache build`."""
    import ray

    _validate(cfg)
    manifest = scan_source(cfg.data, tar_samples=cfg.tar_samples)
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
            root = resume_store(out)
            if root.attrs["dataset"]["root"] != str(manifest.root):  # the same samples (checked above), moved here
                root.attrs["dataset"] = {**root.attrs["dataset"], "root": str(manifest.root)}
            _record_weight_files(root, cfg.teachers)  # the same files (by sha256, checked above), maybe moved
            _redo_changed(out, root, manifest, names)
        todo = None if fresh else _todo(out, root, names, cfg.shard_size)[:cfg.max_shards]
        results, failed, wall, placements = [], {}, 0.0, []
        if todo != []:  # a complete store starts no teacher
            workers, infos = _workers(cfg, out)
            placements = ray.get([w.placement.remote() for w in workers])
            if fresh:
                calibration = _calibrate(workers[0], manifest, settings=settings)
                root = create_store(out, manifest=manifest, settings=settings, infos=infos, calibration=calibration)
                _record_weight_files(root, cfg.teachers)
                todo = _todo(out, root, names, cfg.shard_size)[:cfg.max_shards]
            started = time.perf_counter()
            results, failed = _run_shards(workers, todo, manifest, cfg.shard_size, store=(out, root), token=token,
                                          progress=progress)
            wall = time.perf_counter() - started
            for w in workers:
                ray.kill(w)
        done = done_shards(out, root, names)
        for k, _ in todo or []:  # every shard run is done or failed with its cause: never a silent partial store
            if not done[k] and k not in failed:
                failed[k] = "not done, though its Ray task returned"
        complete = bool(done.all())
        if complete and (todo or not _finalized(root, names)):  # a rerun with nothing to do reads no moments
            root = open_store(out, mode="r+")
            finalize_norm(root)
            _finalize_fidelity(root)
        return _report(out, results, failed, wall, complete, calibrated=fresh, placements=placements)


def _finalized(root, names: list[str]) -> bool:
    """Whether a complete store's statistics were reduced (`finalize_norm`, then `_finalize_fidelity`)."""
    return all("fidelity" in root[L.teacher_group(name)].attrs for name in names)


def _record_weight_files(root, teachers) -> None:
    """Root attrs `weight_files`: {teacher: absolute path} of each teacher built from a local weight file,
    where this build found it. Not part of the identity (which records the file's name and sha256): it
    only tells `radio-eval` and `radio-cache text` where to look without being asked, and they use a
    file there only when its sha256 is still the recorded one."""
    files = weight_files(teachers)
    if files and root.attrs.get("weight_files") != files:
        root.attrs["weight_files"] = files


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
    env_vars = {**(s3_environment() if out.remote else {}), **autocast_environment()}  # actors on other nodes too
    env = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    # a killed actor is restarted (up to 3 times) and its in-flight shards are retried on it until it is back or
    # dead for good: no retry count, which Ray spends on the calls it fails fast (connection refused) before it
    # has heard of the death; with 3, a slow GCS (a loaded machine) spent them all and the shards were lost
    actor = ray.remote(ShardWorker).options(num_gpus=1 if gpus else 0, num_cpus=cpus, max_concurrency=2,
                                            max_restarts=3, max_task_retries=-1, **env)
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
        raise RadioDistillError(f"calibration failed: {error_line(e)}") from None
    for name, targets in result["teachers"].items():
        for target, c in targets.items():
            if not c["met"]:  # pooling alone costs more: the most faithful codec is used
                print(f"warning: teacher '{name}' {target}: no codec meets --fidelity {c['budget']} (best {c['codec']}, "
                      f"held-back mean cos {c['cos_mean']:.5f}); using it. Less pooling may help", file=sys.stderr)
    return result


def _redo_changed(out: Location, root, manifest, names: list[str]) -> None:
    """Clear the done flags of done shards holding an image that is no longer the bytes its targets were
    computed from (replaced under the same name), so the build redoes them whole. Stats every image file
    (tars, Parquet: every file) and compares each shard's stats with its stamp (`provenance.py`, few objects);
    only in shards whose stamp moved are the sources read, and the images whose mtime moved hashed."""
    n, size = root.attrs["num_samples"], root.attrs["shard_size"]
    done = done_shards(out, root, names)
    images = Images(root.attrs["dataset"], manifest.root)
    stats = provenance.source_stats(images, manifest.ids, manifest.locations)  # (N, 2)
    stamps = open_array(out, L.STAMPS).read().result()
    moved = [k for k in np.flatnonzero(done).tolist()
             if provenance.stats_digest(stats[L.shard_rows(k, size, n)]) != stamps[k]]
    if not moved:
        return
    if manifest.tar_samples is not None:  # a changed tar may hold other samples at every row: its shards redone whole
        print(f"warning: {len(moved)} shards' tars changed since they were cached; redoing them", file=sys.stderr)
        commit_shards(out, root, {}, undone=moved)
        return
    rows = np.concatenate([np.arange(L.shard_rows(k, size, n).start, L.shard_rows(k, size, n).stop) for k in moved])
    recorded = read_rows(out, open_array(out, L.SOURCES, strict=True), L.SOURCES, rows)
    rows, recorded = rows[recorded[:, 0] > 0], recorded[recorded[:, 0] > 0]
    locations = None if manifest.locations is None else manifest.locations[rows]
    mask = provenance.changed(images, [manifest.ids[r] for r in rows.tolist()], locations, recorded)
    changed = rows[mask]
    if not changed.size:
        return
    shards = sorted({int(r) // size for r in changed})
    print(f"warning: {changed.size} images changed since they were cached (e.g. '{manifest.ids[int(changed[0])]}'); "
          f"redoing their {len(shards)} shards", file=sys.stderr)
    commit_shards(out, root, {}, undone=shards)


def _todo(out: Location, root, names: list[str], size: int) -> list[tuple[int, bool]]:
    """(shard, retry) to run: those not done, then done ones holding samples a rerun may now read (retry: status
    MISSING, so the status alone says it, not each sample's error)."""
    done = done_shards(out, root, names)
    again = {int(k) // size for k in np.flatnonzero(open_array(out, L.STATUS, strict=True).read().result() == L.MISSING)}
    return [(int(k), False) for k in np.flatnonzero(~done)] + [(k, True) for k in sorted(again) if done[k]]


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
                errors.append(error_line(e))

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


def _run_shards(workers, shards: list[tuple[int, bool]], manifest, size: int, *, store, token: str,
                progress: bool) -> tuple[list[dict], dict[int, str]]:
    """Feed (shard, retry) pairs to workers, two in flight each so decode never waits for dispatch, and commit
    the done state of finished shards every COMMIT_EVERY seconds and at the end (`commit_shards`).

    A shard that fails (its exception, or its actor dying past Ray's restarts) is recorded with its
    one-line cause and the others go on. A shard whose actor was only unavailable (Ray gave up reaching it while
    it restarts) is queued again, up to UNAVAILABLE_TRIES sends in all, and its actor kept.
    Returns (results of the shards run, {shard: cause})."""
    import ray

    out, root = store
    n = len(manifest)
    retried = [k for k, retry in shards if retry]
    if retried:  # not done while they change: a kill now redoes them whole
        commit_shards(out, root, {}, undone=retried)
    queue, results, failed, inflight, tries, finished = list(shards), [], {}, {}, {}, {}
    images = sum(L.shard_rows(k, size, n).stop - L.shard_rows(k, size, n).start for k, _ in shards)
    committed = time.monotonic()

    def submit(worker):
        if queue:
            k, retry = queue.pop(0)
            samples = shard_samples(manifest, k, size)
            inflight[worker.run.remote(k, str(manifest.root), token, samples, retry=retry)] = (worker, (k, retry))

    with Progress("caching", total=images, unit="images", enabled=progress) as bar:
        for w in workers:
            submit(w)
            submit(w)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            w, (k, retry) = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.ActorUnavailableError as e:  # may be back: the shard again, the actor kept
                tries[k] = tries.get(k, 0) + 1
                if tries[k] < UNAVAILABLE_TRIES:
                    queue.insert(0, (k, retry))
                else:
                    failed[k] = error_line(e)
            except ray.exceptions.RayError as e:
                failed[k] = error_line(e)
                if isinstance(e, ray.exceptions.RayActorError):  # gone for good: Ray's restarts are spent
                    continue
            else:
                finished[k] = {key: result.pop(key) for key in ("status", "record", "stamp", "split", "top")
                               if key in result}
                results.append(result)
                bar.advance(L.shard_rows(k, size, n).stop - L.shard_rows(k, size, n).start)
            if finished and (not inflight or time.monotonic() - committed >= COMMIT_EVERY):
                commit_shards(out, root, finished)
                finished, committed = {}, time.monotonic()
            submit(w)
    if finished:
        commit_shards(out, root, finished)
    failed.update({k: "not run: no Ray worker left" for k, _ in queue})
    return results, failed


def shard_samples(manifest, shard: int, size: int) -> dict:
    """What `ShardWorker.run` is given of shard `shard`'s samples from the scan: ids, labels, the scan's errors
    and locations."""
    rows = L.shard_rows(shard, size, len(manifest))
    return {"ids": manifest.ids[rows], "labels": manifest.labels[rows],
            "errors": [manifest.reasons.get(r, "") for r in range(rows.start, rows.stop)],
            "locations": None if manifest.locations is None else manifest.locations[rows]}


def _report(out: Location, results: list[dict], failed: dict[int, str], wall: float, complete: bool, *,
            calibrated: bool, placements: list[dict]) -> dict:
    info = store_info(out)
    done_images = sum(r["images"] for r in results)
    teachers = {}
    for name, t in info["teachers"].items():
        seconds = sum(r["seconds"][name] for r in results)
        views_done = sum(r["views"] for r in results)
        teachers[name] = {"views_per_s": views_done / seconds if seconds else None,
                          "bytes_per_view": t["bytes_per_view"], "fidelity": t["fidelity"], "storage": t["storage"]}
    return {"store": str(out), "complete": complete, "samples": info["samples"] - info["absent"],  # rows of samples
            "absent": info["absent"], "views": info["views"],
            "calibration": info["calibration"] and {**info["calibration"], "ran": calibrated},
            "shards": info["shards_total"], "shards_run": len(results), "images_run": done_images, "seconds": wall,
            "images_per_s": done_images / wall if wall else None, "teachers": teachers, "ok": info["ok"],
            "unreadable": info["unreadable"], "retryable": sum(map(retryable, info["unreadable"].values())),
            "failed": dict(sorted(failed.items())), "workers": placements}


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
