"""`radio-cache info` and `radio-cache verify`: what a store holds, and whether its bytes are sound."""

from pathlib import Path

import numpy as np

from ..errors import CacheIntegrityError
from ..progress import Progress
from . import codecs
from . import layout as L
from .location import Location, location
from .store import done_shards, missing_shards, open_array, open_store, teacher_names


def store_info(path: str | Path | Location) -> dict:
    """Teachers, dims, codecs, fidelity, sizes on disk, shards done, unreadable samples.

    Sample counts cover done shards only: a shard being written (or whose build was killed) may
    hold statuses already, but nothing of it is usable until it is done; its samples are pending."""
    path = location(path)
    root = open_store(path)
    n, views, size = root.attrs["num_samples"], root.attrs["views"], root.attrs["shard_size"]
    names = teacher_names(root)
    done = done_shards(root, names)
    status = np.where(np.repeat(done, size)[:n], root[L.STATUS][:], L.PENDING)
    bad = np.flatnonzero(status == L.UNREADABLE)
    ids, errors = root[L.IDS], root[L.ERRORS]
    teachers = {}
    for name in names:
        attrs = dict(root[L.teacher_group(name)].attrs)
        size = sum(path.size(a) for t in L.TARGETS for a in (L.target_array(name, t), L.scale_array(name, t))
                   if a in root)  # the targets alone: statistics are a fixed cost, not per view
        teachers[name] = {
            "identity": attrs["identity"], "resolution": attrs["resolution"], "grid": attrs["grid"],
            "summary_dim": attrs["summary_dim"], "spatial_dim": attrs["spatial_dim"], "storage": attrs["storage"],
            "fidelity": attrs.get("fidelity"), "calibration": attrs.get("calibration"),
            "bytes": size, "bytes_per_view": size / max(1, n * views),
            "shards_done": int((root[L.done_array(name)][:] == 1).sum()),
        }
    return {"store": str(path), "layout_version": root.attrs["layout_version"], "created_by": root.attrs["created_by"],
            "samples": n, "views": views, "shard_size": root.attrs["shard_size"], "seed": root.attrs["seed"],
            "dataset": root.attrs["dataset"]["root"], "dataset_kind": root.attrs["dataset"].get("kind", "folder"),
            "dataset_files": len(root.attrs["dataset"].get("files", ())), "classes": root.attrs["dataset"]["classes"],
            "shards_total": int(done.size), "shards_done": int(done.sum()),
            "ok": int((status == L.OK).sum()), "pending": int((status == L.PENDING).sum()),
            "unreadable": {str(ids[int(i)]): str(errors[int(i)]) for i in bad},
            "bytes": path.size(), "teachers": teachers, "pixels": root.attrs["settings"].get("pixels"),
            "calibration": root.attrs.get("calibration")}


def verify_store(path: str | Path | Location, *, progress: bool = False) -> dict:
    """Check every shard is done and has its files, and every chunk decodes (crc32c), has its shape and is finite.

    Raises:
        CacheIntegrityError: naming the first failing array and sample.
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
    lost = missing_shards(path, root)
    if lost:  # Zarr would read the shard as fill values: all-zero targets
        array, shard = lost[0]
        rows = L.shard_rows(shard, size, n)
        raise CacheIntegrityError(f"{array}: shard {shard} (samples {rows.start}-{rows.stop - 1}) is done but its file "
                                  f"is gone ({len(lost)} shard files missing); rerun `radio-cache build` to redo it")
    ids = root[L.IDS][:]
    checked = [L.IDS, L.LABELS, L.BOXES, L.STATUS, L.ERRORS]
    for array in checked:
        _read(path, root, array, slice(0, n), ids)
    checked += _verify_calibration(path, root, names, n, ids)
    status = root[L.STATUS][:]
    if (status == L.PENDING).any():
        k = int(np.flatnonzero(status == L.PENDING)[0])
        raise CacheIntegrityError(f"{L.STATUS}: sample '{ids[k]}' was never processed")
    targets = [p for name in names for t in L.TARGETS for p in (L.target_array(name, t), L.scale_array(name, t))
               if p in root] + ([L.PIXELS] if L.PIXELS in root else [])
    n_shards = L.shard_count(n, size)
    with Progress("verifying", total=len(targets) * n_shards, unit="shards", enabled=progress) as bar:
        for array in targets:
            _verify_array(path, root, array, n, size, ids, bar)
    return {"store": str(path), "samples": n, "arrays": len(checked) + len(targets), "ok": True}


def _verify_calibration(path: Location, root, names: list[str], n: int, ids) -> list[str]:
    """The calibration arrays of calibrated teachers decode, are finite and fit their targets: mean (C,),
    cov and PHI-S transform (C, C), a basis (C, k) with orthonormal columns, k the stored channels.
    Returns the arrays checked."""
    checked = []
    if "calibration" in root.attrs:
        rows = _read(path, root, L.CALIBRATION, slice(None), ids)
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
                values = _read(path, root, array, slice(None), ids)
                if values.shape != shape or not np.isfinite(values).all():
                    raise CacheIntegrityError(f"{array}: shape {values.shape} (expected {shape}) or values not finite")
                checked.append(array)
            if "basis" in shapes:
                basis = root[L.calib_array(name, target, "basis")][...].astype(np.float64)
                if basis.shape[1] != k or not np.allclose(basis.T @ basis, np.eye(k), atol=1e-3):
                    raise CacheIntegrityError(f"{L.calib_array(name, target, 'basis')}: not {k} orthonormal columns "
                                              f"(its target stores {k} channels); the targets cannot be decoded")
    return checked


def _verify_array(path: Location, root, array: str, n: int, size: int, ids, bar: Progress) -> None:
    """Every shard of one target array decodes, and float values are finite."""
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
