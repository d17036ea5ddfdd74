"""`radio-cache info` and `radio-cache verify`: what a store holds, and whether its bytes are sound."""

from pathlib import Path

import numpy as np

from ..errors import CacheIntegrityError, CacheLayoutError, DatasetError, RadioDistillError
from ..progress import Progress
from . import codecs
from . import layout as L
from . import provenance
from .group import (commit_shards, done_shards, lost_shards, open_array, open_store, read_rows, read_whole, resume_store,
                    shard_key, teacher_names)
from .lock import build_lock
from .location import Location, location
from .pattern import has_pattern, pattern_strength, read_pattern
from .sources import Images


def store_info(path: str | Path | Location) -> dict:
    """Teachers, dims, codecs, fidelity, sizes on disk, shards done, unreadable samples.

    Sample counts cover done shards only: a shard being written (or whose build was killed) may
    hold statuses already, but nothing of it is usable until it is done; its samples are pending."""
    path = location(path)
    root = open_store(path)
    n, views, size = root.attrs["num_samples"], root.attrs["views"], root.attrs["shard_size"]
    names = teacher_names(root)
    done = done_shards(path, root, names)
    status = np.where(np.repeat(done, size)[:n], open_array(path, L.STATUS).read().result(), L.PENDING)
    bad = np.flatnonzero(np.isin(status, L.BAD))
    ids, errors = root[L.IDS], root[L.ERRORS]
    sizes = _file_bytes(path, root)
    teachers = {}
    for name in names:
        attrs = dict(root[L.teacher_group(name)].attrs)
        size = sum(sizes(a) for a in L.target_arrays(name) if a in root)  # statistics: a fixed cost, not per view
        teachers[name] = {
            "identity": attrs["identity"], "resolution": attrs["resolution"], "grid": attrs["grid"],
            "summary_dim": attrs["summary_dim"], "spatial_dim": attrs["spatial_dim"], "storage": attrs["storage"],
            "fidelity": attrs.get("fidelity"), "calibration": attrs.get("calibration"),
            "bytes": size, "bytes_per_view": size / max(1, n * views),
            "shards_done": int((root[L.done_array(name)][:] == 1).sum()),
            "pattern": _pattern_info(path, root, name), "tiles": attrs.get("tiles"),
        }
    return {"store": str(path), "layout_version": root.attrs["layout_version"], "created_by": root.attrs["created_by"],
            "samples": n, "views": views, "shard_size": root.attrs["shard_size"], "seed": root.attrs["seed"],
            "dataset": root.attrs["dataset"]["root"], "dataset_kind": root.attrs["dataset"].get("kind", "folder"),
            "dataset_files": len(root.attrs["dataset"].get("files", ())), "classes": root.attrs["dataset"]["classes"],
            "shards_total": int(done.size), "shards_done": int(done.sum()),
            "ok": int((status == L.OK).sum()), "pending": int((status == L.PENDING).sum()),
            "absent": int((status == L.ABSENT).sum()),  # rows of unlisted tars past their samples
            "unreadable": {str(ids[int(i)]): str(errors[int(i)]) for i in bad},
            "bytes": sizes(None), "teachers": teachers, "pixels": root.attrs["settings"].get("pixels"),
            "calibration": root.attrs.get("calibration")}


def _pattern_info(path: Location, root, name: str) -> dict | None:
    """The teacher's fixed pattern (`radio-cache pattern`): its strength and what it was estimated from; None
    when not estimated, {'error': why} when its arrays are damaged (`radio-cache verify` names them too)."""
    if not has_pattern(root, name):
        return None
    try:
        offset, var = read_pattern(path, root, name)
    except RadioDistillError as e:
        return {"error": str(e)}
    attrs = dict(root[L.pattern_group(name)].attrs)
    return {"samples": attrs["samples"], "maps": attrs["maps"], **pattern_strength(offset, var, attrs["samples"])}


def _file_bytes(path: Location, root):
    """`sizes(array)`: bytes of an array's files (None: of the store's). From the integrity record (v4 on: the
    shard files, the bulk of a store, in few objects); before, from a listing of the store."""
    if L.SHARDS not in root:
        return lambda array: path.size(array or "")
    record = open_array(path, L.SHARDS).read().result()  # (n_shards, F, 2)
    totals = dict(zip(root[L.SHARDS].attrs["arrays"], record[:, :, 0].sum(0).tolist()))
    return lambda array: sum(totals.values()) if array is None else totals.get(array, 0)


def verify_store(path: str | Path | Location, *, images: str | Path | None = None, progress: bool = False) -> dict:
    """Check every array the trainer reads: every shard is done, its files are there, decode (crc32c), have
    their shapes, hold finite values and the values its build recorded (`provenance.py`, layout v4 on: a file
    swapped with another shard's or replaced is found); the arrays written whole hold theirs. With `images`
    (where the dataset is now: its recorded root, or where it moved), every readable sample's image is hashed
    and compared with the bytes its targets were computed from.

    Raises:
        CacheIntegrityError: naming the first failing array and sample or shard.
        DatasetError: an image that is missing or is not the one the store was built from.
    """
    path = location(path)
    root = open_store(path)
    n, size = root.attrs["num_samples"], root.attrs["shard_size"]
    names = teacher_names(root)
    for name in names:
        flags = root[L.done_array(name)][:]
        if not (flags == 1).all():
            missing = int(np.flatnonzero(flags != 1)[0])
            raise CacheIntegrityError(f"{L.done_array(name)}: shard {missing} is not done "
                                      f"({int((flags != 1).sum())} of {flags.size} missing); rerun `radio-cache build`")
    lost = lost_shards(path, root)
    if lost:  # Zarr would read a lost file as fill values: zero targets, boxes, labels -1
        array, shard, why = lost[0]
        rows = L.shard_rows(shard, size, n)
        raise CacheIntegrityError(f"{array}: shard {shard} (samples {rows.start}-{rows.stop - 1}) {why} ({len(lost)} "
                                  f"shard files lost or altered); run `radio-cache verify {path} --repair`, then rerun "
                                  "the same `radio-cache build` to redo it")
    record = _record(path, root)
    ids = _read(path, root, L.IDS, slice(0, n), None)
    checked = [a for a in (L.IDS, L.LABELS, L.BOXES, L.STATUS, L.ERRORS, L.SOURCES, L.LOCATIONS) if a in root]
    for array in checked:
        values = ids if array == L.IDS else _read(path, root, array, slice(0, n), ids)
        for shard, want in record.get(array, {}).items():
            _same(path, root, array, shard, values[L.shard_rows(shard, size, n)], want)
    for array, shards in record.items():
        if "/moments/" in array:
            stats = L.stat_shards(L.shard_count(n, size))
            for shard, want in shards.items():
                _same(path, root, array, shard, _read(path, root, array, stats.index(shard), ids), want)
            checked.append(array)
    checked += _verify_calibration(path, root, names, n, ids)
    checked += _verify_whole(path, root, names)
    status = read_rows(path, open_array(path, L.STATUS, strict=True), L.STATUS)
    if (status == L.PENDING).any():
        k = int(np.flatnonzero(status == L.PENDING)[0])
        raise CacheIntegrityError(f"{L.STATUS}: sample '{ids[k]}' was never processed")
    targets = [p for name in names for p in L.target_arrays(name) if p in root] + ([L.PIXELS] if L.PIXELS in root else [])
    n_shards = L.shard_count(n, size)
    with Progress("verifying", total=len(targets) * n_shards, unit="shard files", enabled=progress) as bar:
        for array in targets:
            _verify_array(path, root, array, n, size, ids, bar, record.get(array, {}))
    report = {"store": str(path), "samples": n, "arrays": len(checked) + len(targets), "ok": True,
              "records": bool(record)}
    if images is not None:
        report["images"] = _verify_images(path, root, images, ids, status, progress=progress)
    return report


def _record(path: Location, root) -> dict[str, dict[int, int]]:
    """{array: {done shard: digest of the values its build wrote}} from the integrity record ({} before v4)."""
    if L.SHARDS not in root:
        return {}
    record = open_array(path, L.SHARDS).read().result()  # (n_shards, F, 2)
    out = {}
    for j, array in enumerate(root[L.SHARDS].attrs["arrays"]):
        written = np.flatnonzero(record[:, j, 0])  # moments: statistics shards only
        out[array] = dict(zip(written.tolist(), record[written, j, 1].tolist()))
    return out


def repair_store(path: str | Path | Location) -> dict[int, str]:
    """Find the done shards whose files are lost or altered since their build (gone, of another size than
    recorded, failing to decode, holding other values than recorded) and clear their done flags, so that the
    next run of the same `radio-cache build` redoes them: a build's rerun trusts the done state and lists no
    files. Holds the build lock. Returns {shard: the first thing found wrong}.

    Raises:
        CacheLayoutError: a store of a layout this version does not finish (`resume_store`)."""
    path = location(path)
    with build_lock(path):
        root = resume_store(path)
        n, size = root.attrs["num_samples"], root.attrs["shard_size"]
        found = {}
        for array, shard, why in lost_shards(path, root):
            found.setdefault(shard, f"{array} {why}")
        stats = L.stat_shards(L.shard_count(n, size))
        done = done_shards(path, root, teacher_names(root))
        for array, shards in _record(path, root).items():
            for shard, want in shards.items():
                if shard in found or not done[shard]:
                    continue
                rows = stats.index(shard) if "/moments/" in array else L.shard_rows(shard, size, n)
                try:
                    values = root[array][rows]
                except Exception as e:  # zstd or crc32c
                    found[shard] = f"{array} fails to decode ({str(e).splitlines()[0][:80]})"
                    continue
                if not _holds(root, array, values, want):
                    found[shard] = f"{array} holds other values than its build wrote"
        commit_shards(path, root, {}, undone=sorted(found))
    return dict(sorted(found.items()))


def _holds(root, array: str, values, want: int) -> bool:
    """Whether `values` read from `array` are those whose digest its build recorded."""
    return provenance.values_digest(np.asarray(values, dtype=None if values.dtype.kind in "OT" else root[array].dtype)) == want


def _same(path: Location, root, array: str, shard: int, values, want: int) -> None:
    if not _holds(root, array, values, want):
        key = shard_key(root[array].metadata, array, shard, root[L.SHARDS].shape[0])
        raise CacheIntegrityError(f"{array}: shard {shard} holds other values than its build wrote (its file "
                                  f"'{path.key(f'{array}/{key}')}' was swapped with another shard's, or replaced); run "
                                  f"`radio-cache verify {path} --repair`, then rerun the same `radio-cache build`")


def _verify_whole(path: Location, root, names: list[str]) -> list[str]:
    """The norm statistics, text embeddings and fixed patterns (arrays written whole) are there and hold what
    was written; a pattern is of its teacher's grid and width too."""
    arrays = [a for name in names for t in L.TARGETS for a in (*(L.norm_array(name, t, s) for s in ("mean", "cov")),)
              if a in root] + [L.text_array(name) for name in names if L.text_array(name) in root]
    for array in arrays:
        values = read_whole(path, root, array)
        if not np.isfinite(values).all():
            raise CacheIntegrityError(f"{array}: holds NaN or inf")
    for name in names:
        if has_pattern(root, name):
            read_pattern(path, root, name)
            arrays += [L.pattern_array(name, s) for s in L.PATTERN]
    return arrays


def _verify_images(path: Location, root, images, ids, status, *, progress: bool) -> int:
    """Hash the image of every readable sample and compare it with the bytes its targets came from; returns
    how many were compared."""
    source = Images(root.attrs["dataset"], images)
    rows = np.flatnonzero(status == L.OK)
    locations = root[L.LOCATIONS][:] if L.LOCATIONS in root else None
    missing = source.missing(ids[rows], None if locations is None else locations[rows])
    if missing:
        raise DatasetError(f"image '{missing}' is missing; the dataset changed since the store was built, or lives "
                           "elsewhere (--images)")
    if L.SOURCES not in root:
        raise CacheLayoutError(f"store '{path}' is layout v{root.attrs['layout_version']}: it records no image "
                               "digests to compare with; rebuild it with --overwrite")
    recorded = open_array(path, L.SOURCES).read().result()
    step = 1024
    with Progress("hashing images", total=len(rows), unit="images", enabled=progress) as bar:
        for start in range(0, len(rows), step):
            part = rows[start:start + step]
            mask = provenance.changed(source, ids[part], None if locations is None else locations[part],
                                      recorded[part], full=True)
            if mask.any():
                bad = int(part[np.argmax(mask)])
                raise DatasetError(f"image '{source.root / str(ids[bad])}' is not the image the store's targets were "
                                   "computed from (its bytes changed since the build); rerun the same `radio-cache "
                                   "build` to redo its shard, or give the images it was built from (--images)")
            bar.advance(len(part))
    return len(rows)


def _verify_calibration(path: Location, root, names: list[str], n: int, ids) -> list[str]:
    """The calibration arrays of calibrated teachers decode, are finite and fit their targets: mean (C,),
    cov and PHI-S transform (C, C), a basis (C, k) with orthonormal columns, k the stored channels.
    Returns the arrays checked."""
    checked = []
    if "calibration" in root.attrs:
        rows = read_whole(path, root, L.CALIBRATION)
        if rows.size and not (0 <= rows.min() and rows.max() < n):
            raise CacheIntegrityError(f"{L.CALIBRATION}: rows outside 0..{n - 1}")
        checked.append(L.CALIBRATION)
    for name in names:
        attrs = root[L.teacher_group(name)].attrs
        for target in attrs.get("calibration", {}):
            dim, codec = attrs[f"{target}_dim"], attrs["storage"][target]
            k = root[L.target_array(name, target)].shape[-1]
            shapes = {"mean": (dim,), "cov": (dim, dim), "phis": (dim, dim)}
            if codec not in codecs.PLAIN:
                shapes["basis"] = (dim, codecs.stored_channels(codec, dim))
            for a, shape in shapes.items():
                array = L.calib_array(name, target, a)
                values = read_whole(path, root, array)
                if values.shape != shape or not np.isfinite(values).all():
                    raise CacheIntegrityError(f"{array}: shape {values.shape} (expected {shape}) or values not finite")
                checked.append(array)
            if "basis" in shapes:
                basis = root[L.calib_array(name, target, "basis")][...].astype(np.float64)
                if basis.shape[1] != k or not np.allclose(basis.T @ basis, np.eye(k), atol=1e-3):
                    raise CacheIntegrityError(f"{L.calib_array(name, target, 'basis')}: not {k} orthonormal columns "
                                              f"(its target stores {k} channels); the targets cannot be decoded")
    return checked


def _verify_array(path: Location, root, array: str, n: int, size: int, ids, bar: Progress,
                  written: dict[int, int]) -> None:
    """Every shard of one target array decodes, float values are finite, and each holds the values its build
    wrote (`written`: {shard: digest})."""
    handle = open_array(path, array)
    expected = root[array].shape
    if tuple(handle.shape) != tuple(expected) or handle.shape[0] != n:
        raise CacheIntegrityError(f"{array}: shape {tuple(handle.shape)} != expected ({n}, ...)")
    for shard in range(L.shard_count(n, size)):
        bar.advance(info=array)
        rows = L.shard_rows(shard, size, n)
        try:
            values = handle[rows].read().result()
        except Exception:
            _locate(handle, array, rows, ids)
            raise
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            bad = rows.start + int(np.flatnonzero(~np.isfinite(values.reshape(values.shape[0], -1)).all(1))[0])
            raise CacheIntegrityError(f"{array}: sample '{ids[bad]}' holds NaN or inf")
        if shard in written:
            _same(path, root, array, shard, values, written[shard])


def _read(path, root, array, rows, ids):
    try:
        return root[array][rows]
    except Exception as e:
        raise CacheIntegrityError(f"{array}: unreadable chunk ({type(e).__name__}: {e})".splitlines()[0]) from None


def _locate(handle, array: str, rows: slice, ids) -> None:
    """A shard failed to decode: find the first sample whose chunk fails, and say so."""
    for i in range(rows.start, rows.stop):
        try:
            handle[i].read().result()
        except Exception as e:
            reason = str(e).splitlines()[0][:160]
            raise CacheIntegrityError(f"{array}: sample '{ids[i]}' (row {i}) fails to decode: {reason}") from None
    raise CacheIntegrityError(f"{array}: rows {rows.start}-{rows.stop - 1} fail to decode (shard index corrupted)")
