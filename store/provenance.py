"""What every stored value was made from, so a change is noticed instead of trained on.

Three records, made by the worker that writes a shard, before its done flags:

- `samples/sources` (N, 3) int64: per sample the (size, mtime_ns, digest) of the image bytes its
  targets were computed from. mtime is the image file's (folder, list) or its tar / Parquet file's;
  a rerun stats files and hashes only those whose size or mtime moved, so a copied dataset (new
  mtimes, same bytes) is not rebuilt and a replaced picture is.
- `samples/shards` (n_shards, F, 2) int64: per shard and per array in its attrs `arrays`, the (size,
  digest) of the shard's file of that array: its bytes on disk (size) and its decoded values
  (digest). A lost file, one cut short or swapped with another shard's, and a chunk whose values
  changed all disagree with it; the loader compares a shard's sizes when it first meets the shard,
  `verify` lists every file and compares the values.
- `samples/stamps` (n_shards,) int64: per shard the `stats_digest` of its images' (size, mtime) as
  `source_stats` gave them when it was built: a rerun stats the images and reads the sources of only
  the shards whose stamp moved, instead of every shard's file.
The last two are returned to the build's driver, which writes them with the done flags (layout v5).

Arrays written whole once (calibration, norm, text embeddings) carry their (size, digest) in their
own attrs (`WHOLE`). The digest is the crc32c of the values' bytes (strings: UTF-8, NUL-separated):
it finds accidental change (a lost, cut, swapped or replaced file) at several GB/s, where a
cryptographic hash would slow the build's writes; it is no defence against a forger.
"""

import os
from pathlib import Path

import google_crc32c
import numpy as np

from .dataset import UnreadableImage

WHOLE = "written"  # attrs key of a whole array's [size, digest]


def digest(data: bytes) -> int:
    """crc32c of `data` (google-crc32c, which zarr's checksums use too)."""
    return google_crc32c.value(data)


def values_digest(values: np.ndarray) -> int:
    """Digest of an array's values as stored: numbers by their little-endian bytes, strings as UTF-8."""
    values = np.asarray(values)
    if values.dtype.kind in "OUT":
        text = "\0".join(str(v) for v in values.reshape(-1).tolist())
        return digest(text.encode("utf-8", "surrogateescape"))
    return digest(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes())


def read_image(payload, mtime: int = 0) -> tuple[bytes | UnreadableImage, tuple[int, int, int]]:
    """(the image's bytes or why they cannot be read, its source record (size, mtime_ns, digest)).

    `payload` is what `Images.read` gives: a file's path (read here, its mtime recorded), the bytes of
    a tar member or Parquet cell (`mtime`: their file's), or an `UnreadableImage`. The bytes are
    read once and decoded from memory, so the digest is of exactly the bytes decoded."""
    if isinstance(payload, UnreadableImage):
        return payload, (0, 0, 0)
    if isinstance(payload, Path):
        try:
            with open(payload, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime_ns
                data = f.read()
        except FileNotFoundError:
            return UnreadableImage("missing file"), (0, 0, 0)
        except IsADirectoryError:
            return UnreadableImage("not a file (a folder)"), (0, 0, 0)
        except OSError as e:
            return UnreadableImage(str(e)), (0, 0, 0)
    else:
        data = payload
    return data, (len(data), mtime, digest(data))


def file_stats(paths: list[Path]) -> np.ndarray:
    """(B, 2) int64 (size, mtime_ns) of files; (-1, -1) where a file cannot be stat'ed."""
    out = np.full((len(paths), 2), -1, np.int64)
    for k, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[k] = st.st_size, st.st_mtime_ns
    return out


def source_stats(images, ids, locations: np.ndarray | None) -> np.ndarray:
    """(B, 2) int64 (size, mtime_ns) of the file each sample's bytes come from ((-1, -1): cannot be stat'ed);
    for tars and Parquet the size is -1 (a sample is part of the file) and each file is stat'ed once."""
    if not images.packed:
        return file_stats([images.root / i for i in ids])
    files = np.asarray(locations)[:, 0]
    used = np.unique(files)
    stats = file_stats([images.root / images.files[f] for f in used.tolist()])
    stats[:, 0] = -1
    return stats[np.searchsorted(used, files)]


def stats_digest(stats: np.ndarray) -> int:
    """The stamp of a shard: digest of its (S, 2) `source_stats` rows."""
    return values_digest(np.asarray(stats, np.int64))


def changed(images, ids, locations: np.ndarray | None, recorded: np.ndarray, *, full: bool = False) -> np.ndarray:
    """(B,) bool: samples whose image is no longer the bytes their targets were computed from.

    Args:
        images: a `sources.Images` reading the dataset where it is now.
        ids: (B,) sample ids; locations: (B, 3) theirs (packed kinds).
        recorded: (B, 3) their `samples/sources` rows (samples that were read: size > 0).
        full: hash every image (`verify --images`); else only those whose file's mtime moved (a file of
            another size is a change without reading it).

    An image that cannot be read (gone, an I/O error) is not counted: its targets are still what they were,
    and the readers name a missing image themselves.
    """
    ids = list(ids)
    out = np.zeros(len(ids), bool)
    look = np.arange(len(ids))
    if not full:
        stats = source_stats(images, ids, locations)
        out = (stats[:, 0] >= 0) & (stats[:, 0] != recorded[:, 0])
        look = np.flatnonzero(~out & (stats[:, 1] >= 0) & (stats[:, 1] != recorded[:, 1]))
    for start in range(0, len(look), 256):  # bounded memory: a batch of images at a time
        rows = look[start:start + 256]
        payloads = images.read([ids[k] for k in rows], None if locations is None else np.asarray(locations)[rows])
        for k, payload in zip(rows.tolist(), payloads):
            data, (size, _, value) = read_image(payload) if payload is not None else (None, (0, 0, 0))
            out[k] = isinstance(data, bytes) and (size, value) != (recorded[k, 0], recorded[k, 2])
    return out
