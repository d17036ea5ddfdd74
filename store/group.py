"""Create, open and write the Zarr v3 store laid out in `layout.py`.

zarr-python creates the arrays and handles the small sample arrays; tensorstore does the hot
path (whole-shard writes of target arrays, bulk reads), being 5-20x faster on the same bytes.
Every array carries zstd + crc32c, so a corrupted chunk fails its checksum on read, and every chunk
written has its file (fill values too), so an absent file is a loss; what each shard wrote is recorded
(`provenance.py`) and checked against the files.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import tensorstore as ts
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .. import __version__
from ..errors import CacheIntegrityError, CacheLayoutError, RadioDistillError
from . import codecs
from . import layout as L
from . import provenance
from .dataset import Manifest, numbered_classes
from .layout import TeacherInfo
from .location import Location, location
from .sources import Images

zarr.config.set({"array.write_empty_chunks": True})  # a chunk of fill values still gets its file: absent = lost


def compressors():
    return [ZstdCodec(level=1), Crc32cCodec()]


def open_store(path: str | Path | Location, *, mode: str = "r") -> zarr.Group:
    """Open a store (a folder or an `s3://` prefix), checking it is ours, of a layout version this version
    reads and whole (every array's metadata there).

    Raises:
        CacheLayoutError: one line saying what the folder holds and what to do (or why S3 refused).
    """
    path = location(path)
    path.check()
    if not path.exists("zarr.json"):
        # a build's lock; on S3 its lease, or the staging a failed creation left (the lease went with its build)
        if any(path.exists(m) for m in ((L.HOLDER_FILE, L.STAGING) if path.remote else (L.LOCK_FILE,))):
            raise CacheLayoutError(f"store '{path}' is not created yet: a build is creating it or was stopped while "
                                   "creating it; rerun the same `radio-cache build` command")
        raise CacheLayoutError(f"'{path}' is not a radio-distill store (no zarr.json); build one with `radio-cache build`")
    try:
        root = zarr.open_group(path.zarr_store(read_only=mode == "r"), mode=mode, zarr_format=3)
    except (ValueError, KeyError, TypeError) as e:  # zarr.json cut short by a kill or a full disk
        raise CacheLayoutError(f"store '{path}' is half-created ({type(e).__name__} reading zarr.json); "
                               "rebuild it with `radio-cache build ... --overwrite`") from None
    fmt, version = root.attrs.get("format"), root.attrs.get("layout_version")
    if fmt != L.FORMAT:
        raise CacheLayoutError(f"'{path}' is a Zarr group but not a radio-distill store (format {fmt!r})")
    if version not in L.READS:
        raise CacheLayoutError(f"store '{path}' is layout v{version}, this version reads "
                               f"{', '.join(f'v{v}' for v in L.READS)}; rebuild it with `radio-cache build ... --overwrite`")
    missing = _missing_arrays(path, root.attrs)
    if missing:
        raise CacheLayoutError(f"store '{path}' is half-created or damaged: {missing[0]} is missing"
                               f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                               "rebuild it with `radio-cache build ... --overwrite`")
    return root


def _missing_arrays(path: Location, store_attrs: dict) -> list[str]:
    """The arrays (or teacher groups) `create_store` makes for a store with these root attributes whose
    metadata is absent."""
    settings = store_attrs["settings"]
    arrays = [L.IDS, L.LABELS, L.BOXES, L.STATUS, L.ERRORS] + ([L.PIXELS] if settings["pixels"] else [])
    arrays += [L.LOCATIONS] if Images(store_attrs["dataset"]).packed else []
    arrays += [L.SOURCES, L.SHARDS] if store_attrs["layout_version"] >= 4 else []
    arrays += [L.SPLIT, L.STAMPS] if store_attrs["layout_version"] >= 5 else []
    missing = []
    for name in settings["storage"]:
        try:
            attrs = json.loads(path.read_text(f"{L.teacher_group(name)}/zarr.json"))["attributes"]
        except (OSError, ValueError, KeyError):  # absent, or cut short by a kill
            missing.append(L.teacher_group(name))
            continue
        storage, calibrated = attrs["storage"], attrs.get("calibration", {})  # the codecs chosen
        for target in ("spatial", "summary") if attrs["summary_dim"] is not None else ("spatial",):
            codec = storage[target]
            arrays.append(L.target_array(name, target))
            arrays += [L.scale_array(name, target)] if codecs.parse(codec, attrs[f"{target}_dim"])[0] == "int8" else []
            arrays += [L.moment_array(name, target, m) for m in ("count", "sum", "gram")]
            if target in calibrated:
                arrays += [L.calib_array(name, target, a) for a in L.CALIB if a != "basis" or codec not in codecs.PLAIN]
        arrays.append(L.done_array(name))
    return missing + [a for a in arrays if not path.exists(f"{a}/zarr.json")]


def create_store(path: str | Path | Location, *, manifest: Manifest, settings: dict, infos: dict[str, TeacherInfo],
                 calibration: dict | None = None) -> zarr.Group:
    """Create every array of a new store at `path`, replacing the store there; targets start empty, no shard done.

    The caller holds the build lock (`lock.build_lock`). The store is made in `path/.partial` and moved
    in with zarr.json last, so a kill or a full disk never leaves a store that looks whole but is not.
    S3 has no rename: the old zarr.json is deleted first, then every object is copied in (a new store's
    target arrays hold no chunks yet, so this is its metadata and sample arrays) and zarr.json last.

    Args:
        settings: the build's identity: teachers, storage, views, seed, shard_size, dataset fingerprint.
        infos: what each teacher produces, by teacher name.
        calibration: what the calibration pass returned (`ShardWorker.calibrate`) when a teacher has a
            fidelity budget: its codecs, statistics and transforms are stored, and its targets use them.

    Raises:
        RadioDistillError: the store cannot be written (disk full...); `path` then holds no store.
    """
    path = location(path)
    if path.remote:
        _create_remote(path, manifest=manifest, settings=settings, infos=infos, calibration=calibration or {})
        return open_store(path, mode="r+")
    path = path.path
    staging = path / L.STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what a killed creation left
    try:
        _create(staging, manifest=manifest, settings=settings, infos=infos, calibration=calibration or {})
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise RadioDistillError(f"cannot create store '{path}': {e.strerror or e}; nothing was left there") from None
    (path / "zarr.json").unlink(missing_ok=True)  # first: from here on `path` is no store until the new zarr.json
    for old in path.iterdir():
        if old.name in L.STORE_NAMES:  # only what a store holds: a file the user put beside it stays
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for new in staging.iterdir():
        if new.name != "zarr.json":
            new.rename(path / new.name)
    (staging / "zarr.json").rename(path / "zarr.json")
    staging.rmdir()
    return open_store(path, mode="r+")


def _create_remote(path: Location, **create) -> None:
    """`create_store` on S3: staged under `.partial`, copied in with zarr.json last (see there)."""
    staging = Location(f"{path.url}/{L.STAGING}")
    path.delete(L.STAGING)  # what a killed creation left
    try:
        _create(staging.zarr_store(read_only=False), **create)
        path.delete("zarr.json")  # first: from here on `path` is no store until the new zarr.json
        for old in path.names() & set(L.STORE_NAMES):
            path.delete(old)
        keys = sorted(staging.files(""), key=lambda k: k == "zarr.json")  # the root's metadata last
        for key in keys:
            path.fs.copy(staging.key(key), path.key(key))
        path.delete(L.STAGING)
    except OSError as e:
        raise RadioDistillError(f"cannot create store '{path}': {e.strerror or e}; rerun the same command") from None


def _create(path: Path, *, manifest: Manifest, settings: dict, infos: dict[str, TeacherInfo], calibration: dict) -> None:
    n, views, size = len(manifest), settings["views"], settings["shard_size"]
    root = zarr.open_group(path, mode="w")
    root.attrs.update({"format": L.FORMAT, "layout_version": L.LAYOUT_VERSION, "created_by": f"radio-distill {__version__}",
                       "settings": settings, "num_samples": n, "views": views, "shard_size": size,
                       "seed": settings["seed"], "dataset": {**manifest.source(), "classes": list(manifest.classes),
                                                            "fingerprint": settings.get("dataset") or manifest.fingerprint()}})
    rows = (min(size, n),)
    ids, labels = _array(root, L.IDS, (n,), str, rows), _array(root, L.LABELS, (n,), "int32", rows, fill=-1)
    errors = _array(root, L.ERRORS, (n,), str, rows)
    locations = _array(root, L.LOCATIONS, (n, 3), "int64", (rows[0], 3)) if manifest.locations is not None else None
    split = _array(root, L.SPLIT, (n,), "uint16", (min(n, L.STATUS_CHUNK),))
    block = size * max(1, L.STATUS_CHUNK // size)  # whole chunks of every sample array: each written once
    for start in range(0, n, block):  # a block at a time: a manifest may generate its ids (100M: ~10 GB as str)
        part = slice(start, min(n, start + block))
        some = list(manifest.ids[part])
        ids[part] = np.asarray(some, dtype=object)
        labels[part] = np.asarray(manifest.labels[part], dtype=np.int32)
        split[part] = np.fromiter(map(L.split_key, some), np.uint16, len(some))
        errors[part] = np.asarray([manifest.reasons.get(k, "") for k in range(part.start, part.stop)], dtype=object)
        if locations is not None:
            locations[part] = manifest.locations[part]
    _array(root, L.BOXES, (n, views, 4), "float32", (rows[0], views, 4))
    _array(root, L.STATUS, (n,), "uint8", (min(n, L.STATUS_CHUNK),), fill=L.PENDING)[:] = np.full(n, L.PENDING, np.uint8)
    _array(root, L.SOURCES, (n, 3), "int64", (rows[0], 3))
    if settings["pixels"]:
        r = settings["pixels"]
        _array(root, L.PIXELS, (n, views, r, r, 3), "uint8", (1, 1, r, r, 3), shards=(size, views, r, r, 3))
    if calibration:
        root.attrs["calibration"] = {"samples": len(calibration["rows"]), "held": calibration["held"],
                                     "seconds": calibration["seconds"]}
        write_whole(root, L.CALIBRATION, calibration["rows"])
    n_shards = L.shard_count(n, size)
    n_stats = len(L.stat_shards(n_shards))
    for name, info in infos.items():
        calibrated = calibration.get("teachers", {}).get(name, {})
        storage = {**settings["storage"][name], **{t: c["codec"] for t, c in calibrated.items()}}
        grid = tuple(g // storage["pool"] for g in info.grid)
        group = root.create_group(L.teacher_group(name))
        group.attrs.update({"identity": settings["teachers"][name], "storage": storage, "grid": list(grid),
                            **{k: v for k, v in asdict(info).items() if k != "grid" and (k != "tiles" or v)}, "source_grid": list(info.grid)})
        if calibrated:  # what the budget tried, measured on held-back calibration samples
            group.attrs["calibration"] = {t: {k: v for k, v in c.items() if k != "arrays"} for t, c in calibrated.items()}
        for target, c in calibrated.items():
            for a, value in c["arrays"].items():
                write_whole(root, L.calib_array(name, target, a), value)
        dims = {"summary": info.summary_dim, "spatial": info.spatial_dim}
        token_shape = {"summary": (), "spatial": grid}
        for target, dim in dims.items():
            if dim is None:
                continue
            number, k = codecs.parse(storage[target], dim)
            shape, chunk = (n, views, *token_shape[target]), (1, 1, *token_shape[target])
            _array(root, L.target_array(name, target), (*shape, k or dim), "float16" if number == "fp16" else "int8",
                   (*chunk, k or dim), shards=(size, views, *token_shape[target], k or dim))
            if number == "int8":
                _array(root, L.scale_array(name, target), shape, "float16", chunk,
                       shards=(size, views, *token_shape[target]))
            _array(root, L.moment_array(name, target, "count"), (n_stats,), "int64", (1,))
            _array(root, L.moment_array(name, target, "sum"), (n_stats, dim), "float64", (1, dim))
            _array(root, L.moment_array(name, target, "gram"), (n_stats, dim, dim), "float64", (1, dim, dim))
            _array(root, L.moment_array(name, target, "fidelity"), (n_stats, 3), "float64", (1, 3))
        _array(root, L.done_array(name), (n_shards,), "uint8", (min(n_shards, L.DONE_CHUNK),))[:] = 0
    _array(root, L.STAMPS, (n_shards,), "int64", (min(n_shards, L.DONE_CHUNK),))[:] = 0
    files = shard_arrays(root)
    record = _array(root, L.SHARDS, (n_shards, len(files), 2), "int64", (min(n_shards, L.RECORD_CHUNK), len(files), 2))
    record.attrs["arrays"] = files
    record[:] = 0


def shard_arrays(root: zarr.Group) -> list[str]:
    """The arrays of which each shard's worker writes (or reads and vouches for) one file, in the order of
    the shard record (`samples/shards`)."""
    samples = [L.IDS, L.LABELS, L.BOXES, L.ERRORS, L.SOURCES, L.LOCATIONS, L.PIXELS]  # status: the driver's
    per_teacher = [p for name in teacher_names(root) for p in L.target_arrays(name)] + \
        [L.moment_array(name, t, m) for name in teacher_names(root) for t in L.TARGETS
         for m in L.MOMENTS]
    return [a for a in samples + per_teacher if a in root]


def shard_key(meta, array: str, shard: int, n_shards: int) -> str | None:
    """The key below `array` of shard `shard`'s file (`meta`: the array's metadata); None for a moments
    array and a shard that feeds no statistics (moment row k is statistics shard k)."""
    index = shard
    if "/moments/" in array:
        stats = L.stat_shards(n_shards)
        if shard not in stats:
            return None
        index = stats.index(shard)
    return meta.encode_chunk_key((index,) + (0,) * (len(meta.shape) - 1))


def write_whole(root: zarr.Group, name: str, value: np.ndarray, **create) -> None:
    """Write an array of one chunk whole, with the digest of its values in its attrs (`provenance.WHOLE`)."""
    arr = _array(root, name, value.shape, value.dtype.name, value.shape or (1,), **create)
    arr[...] = value
    arr.attrs[provenance.WHOLE] = provenance.values_digest(value)


def read_whole(path: str | Path | Location, root: zarr.Group, name: str) -> np.ndarray:
    """An array written whole (`write_whole`), checked: its file is there and its values are those written.

    Raises:
        CacheIntegrityError: naming the array, when its file is gone, fails to decode or holds other values.
    """
    arr = root[name]
    key = arr.metadata.encode_chunk_key((0,) * len(arr.shape))
    if not location(path).exists(f"{name}/{key}"):
        raise CacheIntegrityError(f"store '{path}': {name} is gone (its file {key} is missing); run "
                                  f"`radio-cache verify {path}`, and rebuild the store with --overwrite")
    try:
        value = arr[...]
    except Exception as e:  # zstd or crc32c of a damaged file
        raise CacheIntegrityError(f"store '{path}': {name} fails to decode ({str(e).splitlines()[0][:120]}); "
                                  "rebuild the store with --overwrite") from None
    want = arr.attrs.get(provenance.WHOLE)
    if want is not None and provenance.values_digest(value) != want:
        raise CacheIntegrityError(f"store '{path}': {name} holds other values than were written (its file was "
                                  "replaced); rebuild the store with --overwrite")
    return value


def _array(root: zarr.Group, name: str, shape, dtype, chunks, *, shards=None, fill=0, overwrite=False):
    return root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, overwrite=overwrite,
                             compressors=compressors(), fill_value="" if dtype is str else fill)


def check_settings(root: zarr.Group, settings: dict, path: str | Path | Location) -> None:
    """A store is resumed only by the build that made it: same teachers, storage, views, data."""
    have = root.attrs["settings"]
    if have == settings:
        return
    diff = sorted(k for k in set(have) | set(settings) if have.get(k) != settings.get(k))
    raise CacheLayoutError(f"store '{path}' was built with other {', '.join(diff)} "
                           f"({json.dumps({k: have.get(k) for k in diff})[:200]}); "
                           "use another --out, or --overwrite to rebuild it")


def open_array(store: str | Path | Location, name: str, *, strict: bool = False) -> ts.TensorStore:
    """Open an existing array of the store with tensorstore (the hot path).

    Chunks equal to the fill value are written too (tensorstore skips them by default), so every
    written shard has its file even when all its samples are unreadable: a missing file is a loss.
    `strict`: reading a chunk whose file is absent fails (`CacheIntegrityError` from `read_rows`) instead of
    giving fill values: for files that must be there (a done shard's, the done state of layout v5)."""
    spec = {"driver": "zarr3", "kvstore": location(store).kvstore(name), "store_data_equal_to_fill_value": True,
            "fill_missing_data_reads": not strict}
    return ts.open(spec, open=True).result()


def read_rows(store: str | Path | Location, handle: ts.TensorStore, array: str, rows=slice(None), *,
              what: str = "") -> np.ndarray:
    """`handle[rows]` read (rows: a slice, or an integer array in any order); a file that is absent (a strict
    handle) or fails its checksum raises one line naming the array (and `what` was read).

    Raises:
        CacheIntegrityError: run `radio-cache verify --repair` to have the build redo the shards concerned."""
    try:
        if isinstance(rows, slice):
            return handle[rows].read().result()
        return handle.oindex[np.asarray(rows, np.int64)].read().result()
    except (ValueError, RuntimeError) as e:
        lost = "not found" in str(e).lower() or "missing" in str(e).lower()
        why = "a file of it is gone" if lost else f"a chunk fails to decode ({str(e).splitlines()[0][:160]})"
        raise CacheIntegrityError(f"{array}: {why}{f' (reading {what})' if what else ''}; run `radio-cache verify "
                                  f"{store} --repair`, then rerun the same `radio-cache build` to redo its shards") from None


def commit_shards(path: str | Path | Location, root: zarr.Group, done: dict[int, dict], undone: list[int] = ()) -> None:
    """Record shards whose files are written, as the build's driver alone does: their status rows and integrity
    records first, then their done flags (a kill between the two leaves them not done: redone, never trusted
    half-recorded); and clear the flags of `undone` shards (done ones about to be redone).

    Args:
        done: {shard: {'status': (S,) uint8, 'record': (F, 2) int64, 'stamp': int}} as `ShardWorker.run`
            returns them; of tars planned unlisted also 'split': (S,) uint16 split keys of the ids the worker
            listed, and 'top': their largest label (the classes grow to it, before the flags).
    """
    path, names = location(path), teacher_names(root)
    n, size = root.attrs["num_samples"], root.attrs["shard_size"]
    with ts.Transaction() as txn:  # each chunk read, changed by every shard in it, and written once
        status, record, stamps = (open_array(path, a).with_transaction(txn) for a in (L.STATUS, L.SHARDS, L.STAMPS))
        split = open_array(path, L.SPLIT).with_transaction(txn) if any("split" in r for r in done.values()) else None
        for k, result in done.items():
            status[L.shard_rows(k, size, n)] = result["status"]
            record[k] = result["record"]
            stamps[k] = result["stamp"]
            if "split" in result:
                split[L.shard_rows(k, size, n)] = result["split"]
    top = max((r["top"] for r in done.values() if "top" in r), default=-1)
    dataset = root.attrs["dataset"]
    if top >= len(dataset["classes"]):
        root.attrs["dataset"] = {**dataset, "classes": list(numbered_classes(top, f"store '{path}'"))}
    for value, shards in ((0, list(undone)), (1, sorted(done))):
        if shards:
            with ts.Transaction() as txn:
                for name in names:
                    open_array(path, L.done_array(name)).with_transaction(txn).oindex[np.asarray(shards)] = value


def done_shards(path: str | Path | Location, root: zarr.Group, teachers: list[str]) -> np.ndarray:
    """(n_shards,) bool: shards done for every teacher (tensorstore: before v5 a flag was a file)."""
    strict = root.attrs["layout_version"] >= 5
    flags = [read_rows(path, open_array(path, L.done_array(t), strict=strict), L.done_array(t)) == 1 for t in teachers]
    return np.logical_and.reduce(flags)


def lost_shards(path: str | Path | Location, root: zarr.Group) -> list[tuple[str, int, str]]:
    """(array, shard, what is wrong) of every file a done shard wrote that is not as written: gone (Zarr would
    read fill values), or of another size than its record says (cut short, replaced, swapped with another
    shard's), or a done shard without a record. One listing per array (on S3 a request per 1000 files).

    A store before layout v4 has no record: the files of its target, scale, pixels and status arrays must
    be there."""
    path = location(path)
    names = teacher_names(root)
    # tensorstore: a flag per shard is a chunk per shard, which zarr-python reads one by one (6 s at 1.28M samples)
    done = {name: open_array(path, L.done_array(name)).read().result() == 1 for name in names}
    if L.SHARDS not in root:
        return _lost_v3(path, root, done)
    shards = np.flatnonzero(np.logical_or.reduce(list(done.values())))  # the record is written before any flag
    if not shards.size:
        return []
    record = open_array(path, L.SHARDS)[shards].read().result()  # (n_done, F, 2)
    n_shards = len(next(iter(done.values())))
    found = []
    for j, array in enumerate(root[L.SHARDS].attrs["arrays"]):
        meta, sizes = root[array].metadata, path.sizes(array)
        for row, k in enumerate(shards.tolist()):
            key = shard_key(meta, array, k, n_shards)
            if key is None:
                continue
            want, have = int(record[row, j, 0]), sizes.get(key)
            if want == 0:
                found.append((array, k, "has no integrity record (its build was stopped while recording it)"))
            elif have is None:
                found.append((array, k, "is done but its file is gone"))
            elif have != want:
                found.append((array, k, f"file is {have} bytes, {want} when it was written (cut short, replaced or "
                                        "swapped with another shard's)"))
    return found


def _lost_v3(path: Location, root: zarr.Group, done: dict) -> list[tuple[str, int, str]]:
    names = teacher_names(root)
    shared = [L.STATUS] + ([L.PIXELS] if root.attrs["settings"]["pixels"] else [])  # written before every flag
    owners = {**{p: names for p in shared}, **{p: [name] for name in names for p in L.target_arrays(name) if p in root}}
    found = []
    for array, teachers in owners.items():
        meta = root[array].metadata
        shards = np.flatnonzero(np.logical_and.reduce([done[t] for t in teachers]))
        present = path.files(array) if shards.size else set()
        for k in shards:
            if meta.encode_chunk_key((int(k),) + (0,) * (len(meta.shape) - 1)) not in present:
                found.append((array, int(k), "is done but its file is gone"))
    return found


def resume_store(path: str | Path | Location) -> zarr.Group:
    """Open a store to resume its build (the caller holds the lock and checked its settings). Reads no listing:
    the done state says what is written; `radio-cache verify --repair` finds what was lost since.

    Raises:
        CacheLayoutError: a store of a layout before v5 (its done state is a file per shard)."""
    root = open_store(path, mode="r+")
    if root.attrs["layout_version"] < L.LAYOUT_VERSION:
        raise CacheLayoutError(f"store '{path}' is layout v{root.attrs['layout_version']}: this version reads it but "
                               f"finishes only v{L.LAYOUT_VERSION} stores; train on it as it is (--allow-partial), or "
                               "rebuild it with --overwrite")
    return root


def weights_label(identity: dict) -> str:
    """How a teacher's weights are described to users: tiny and random-init teachers say so."""
    if identity.get("preset") == "tiny":
        return "tiny preset: toy size, random weights"
    if identity.get("preset") == "toy":
        return "toy preset: small teachers trained on generated scenes"
    return "random weights" if identity.get("random_init") else ""


def teacher_names(root: zarr.Group) -> list[str]:
    return sorted(root.attrs["settings"]["teachers"])


def finalize_norm(root: zarr.Group) -> None:
    """Reduce the per-shard moments into mean and covariance arrays (for PHI-S and standardisation)."""
    for name in teacher_names(root):
        group = root[L.teacher_group(name)]
        norm = {}
        for target in L.TARGETS:
            if L.moment_array(name, target, "count") not in root:
                continue
            count = int(root[L.moment_array(name, target, "count")][:].sum())
            total = root[L.moment_array(name, target, "sum")][:].sum(0)
            gram = root[L.moment_array(name, target, "gram")][:].sum(0)
            mean = total / max(count, 1)
            cov = gram / max(count, 1) - np.outer(mean, mean)
            for stat, value in (("mean", mean), ("cov", cov)):
                write_whole(root, L.norm_array(name, target, stat), value, overwrite=True)
            norm[target] = {"count": count}
        group.attrs["norm"] = norm
