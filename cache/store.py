"""Create, open and write the Zarr v3 store laid out in `layout.py`.

zarr-python creates the arrays and handles the small sample arrays; tensorstore does the hot
path (whole-shard writes of target arrays, bulk reads), being 5-20x faster on the same bytes.
Every array carries zstd + crc32c, so a corrupted chunk fails its checksum on read.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tensorstore as ts
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .. import __version__
from ..errors import CacheLayoutError
from . import layout as L
from .dataset import Manifest

if TYPE_CHECKING:  # the trainer imports this module; it must not pull in the teachers
    from .teachers import TeacherInfo


def _compressors():
    return [ZstdCodec(level=1), Crc32cCodec()]


def open_store(path: str | Path, *, mode: str = "r") -> zarr.Group:
    """Open a store, checking it is ours and of this layout version."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheLayoutError(f"'{path}' is not a radio-distill store (no zarr.json); build one with `radio-cache build`")
    root = zarr.open_group(path, mode=mode)
    fmt, version = root.attrs.get("format"), root.attrs.get("layout_version")
    if fmt != L.FORMAT:
        raise CacheLayoutError(f"'{path}' is a Zarr group but not a radio-distill store (format {fmt!r})")
    if version != L.LAYOUT_VERSION:
        raise CacheLayoutError(f"store '{path}' is layout v{version}, this version reads v{L.LAYOUT_VERSION}; "
                               "rebuild it with `radio-cache build ... --overwrite`")
    return root


def create_store(path: Path, *, manifest: Manifest, settings: dict, infos: dict[str, TeacherInfo]) -> zarr.Group:
    """Create every array of a new store (overwriting `path`); targets start empty, no shard done.

    Args:
        settings: the build's identity: teachers, storage, views, seed, shard_size, dataset fingerprint.
        infos: what each teacher produces, by teacher name.
    """
    n, views, size = len(manifest), settings["views"], settings["shard_size"]
    root = zarr.open_group(path, mode="w")
    root.attrs.update({"format": L.FORMAT, "layout_version": L.LAYOUT_VERSION, "created_by": f"radio-distill {__version__}",
                       "settings": settings, "num_samples": n, "views": views, "shard_size": size,
                       "seed": settings["seed"], "dataset": {"root": str(manifest.root), "classes": list(manifest.classes),
                                                            "fingerprint": manifest.fingerprint()}})
    rows = (min(size, n),)
    _array(root, L.IDS, (n,), str, rows)[:] = np.asarray(manifest.ids, dtype=object)
    _array(root, L.LABELS, (n,), "int32", rows, fill=-1)[:] = np.asarray(manifest.labels, dtype=np.int32)
    _array(root, L.BOXES, (n, views, 4), "float32", (rows[0], views, 4))
    _array(root, L.STATUS, (n,), "uint8", rows, fill=L.PENDING)
    _array(root, L.ERRORS, (n,), str, rows)
    if settings["pixels"]:
        r = settings["pixels"]
        _array(root, L.PIXELS, (n, views, r, r, 3), "uint8", (1, 1, r, r, 3), shards=(size, views, r, r, 3))
    n_shards = L.shard_count(n, size)
    n_stats = len(L.stat_shards(n_shards))
    for name, info in infos.items():
        storage = settings["storage"][name]
        grid = tuple(g // storage["pool"] for g in info.grid)
        group = root.create_group(L.teacher_group(name))
        group.attrs.update({"identity": settings["teachers"][name], "storage": storage, "grid": list(grid),
                            **{k: v for k, v in asdict(info).items() if k != "grid"}, "source_grid": list(info.grid)})
        dims = {"summary": info.summary_dim, "spatial": info.spatial_dim}
        token_shape = {"summary": (), "spatial": grid}
        for target, dim in dims.items():
            if dim is None:
                continue
            codec = storage[target]
            shape, chunk = (n, views, *token_shape[target]), (1, 1, *token_shape[target])
            _array(root, L.target_array(name, target), (*shape, dim), "float16" if codec == "fp16" else "int8",
                   (*chunk, dim), shards=(size, views, *token_shape[target], dim))
            if codec == "int8":
                _array(root, L.scale_array(name, target), shape, "float16", chunk,
                       shards=(size, views, *token_shape[target]))
            _array(root, L.moment_array(name, target, "count"), (n_stats,), "int64", (1,))
            _array(root, L.moment_array(name, target, "sum"), (n_stats, dim), "float64", (1, dim))
            _array(root, L.moment_array(name, target, "gram"), (n_stats, dim, dim), "float64", (1, dim, dim))
        _array(root, L.done_array(name), (n_shards,), "uint8", (1,))
    return root


def _array(root: zarr.Group, name: str, shape, dtype, chunks, *, shards=None, fill=0):
    return root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                             compressors=_compressors(), fill_value="" if dtype is str else fill)


def check_settings(root: zarr.Group, settings: dict, path: Path) -> None:
    """A store is resumed only by the build that made it: same teachers, storage, views, data."""
    have = root.attrs["settings"]
    if have == settings:
        return
    diff = sorted(k for k in set(have) | set(settings) if have.get(k) != settings.get(k))
    raise CacheLayoutError(f"store '{path}' was built with other {', '.join(diff)} "
                           f"({json.dumps({k: have.get(k) for k in diff})[:200]}); "
                           "use another --out, or --overwrite to rebuild it")


def open_array(store: Path, name: str) -> ts.TensorStore:
    """Open an existing array of the store with tensorstore (the hot path)."""
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(store) / name)}}
    return ts.open(spec, open=True).result()


def done_shards(root: zarr.Group, teachers: list[str]) -> np.ndarray:
    """(n_shards,) bool: shards done for every teacher."""
    flags = [root[L.done_array(t)][:] == 1 for t in teachers]
    return np.logical_and.reduce(flags)


def weights_label(identity: dict) -> str:
    """How a teacher's weights are described to users: tiny and random-init teachers say so."""
    if identity.get("preset") == "tiny":
        return "tiny preset: toy size, random weights"
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
                arr = root.create_array(L.norm_array(name, target, stat), shape=value.shape, dtype="float64",
                                        chunks=value.shape, compressors=_compressors(), overwrite=True)
                arr[...] = value
            norm[target] = {"count": count}
        group.attrs["norm"] = norm
