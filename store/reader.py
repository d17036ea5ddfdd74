"""The one module through which training reads a store: metadata, the split, and a DataLoader.

Each item is one (sample, view): the view's box cropped from the original image and resized to
the student resolution (uint8) — or, when the build stored view pixels at that resolution
(`--pixels`), those, with no JPEG decode — plus that view's stored targets for every teacher,
still encoded.
Decoding (int8 x scale, then for a calibrated codec one matmul with its stored basis, plus the mean)
happens on the training device. Loader workers are spawned (zarr and
tensorstore threads deadlock after fork) and open their tensorstore handles inside the worker;
they read a whole batch with one tensorstore read per array.

Sized for DataComp-scale stores (10^8 samples and more): opening reads the done flags and nothing per
sample; a split's status and split keys are read a block at a time when the sampler first draws from it
(`Split`), and the sampler permutes integer indices without an array per epoch; loader workers get no per-sample array and read the ids, boxes and locations of their batch's
rows (`Column`); a done shard's files are checked against its integrity record when first met, and the
image check looks at a seeded sample of the files in a few shards (a file missing later is named when
it is read). Images in tars or Parquet files are read by their stored locations: a member's bytes at its
offset, a Parquet row from its row group; no tar is scanned.

Letters: N samples, B batch, R student side, V views, h, w teacher grid, C channels, D summary dims.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CacheIntegrityError, CacheLayoutError, DatasetError, RadioDistillError
from . import codecs
from . import layout as L
from . import provenance
from .dataset import UnreadableImage, load_rgb
from .group import done_shards, open_array, open_store, read_rows, read_whole, teacher_names
from .location import Location, location
from .pattern import read_pattern
from .sources import Images
from .views import crop_resize

# `radio-train --denoise`: targets as stored, less their teacher's fixed pattern, or another view's map over the
# overlap of the two views (`train/shift.py`)
DENOISE = ("none", "mean", "shift")
IMAGE_CHECKS = 1024  # image files looked at before training: enough to catch a moved or partly copied dataset


@dataclass(frozen=True)
class TeacherMeta:
    """What training needs to know of one teacher, read from its attrs and norm arrays."""

    name: str
    summary_dim: int | None
    spatial_dim: int
    grid: tuple[int, int]
    arrays: tuple[str, ...]  # target and scale arrays present
    norm: dict  # {'summary'|'spatial': {'mean': (C,), 'cov': (C, C)}} float64 numpy
    transforms: dict = field(default_factory=dict)  # {target: {device: (mean (C,), basis (C, k))}} float32 of
    # calibrated codecs ('cpu' as read, other devices added by `decode_targets`)
    resolution: int | None = None  # the teacher's input side
    model: str | None = None  # the teacher without its resolution: entries of one model at several sides share it
    pattern: dict = field(default_factory=dict)  # {device: (h, w, C) float32} the fixed pattern `decode_targets`
    # subtracts from the spatial targets (`--denoise mean`; 'cpu' as read, other devices added there); {} keeps them


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Deterministic split by sample id (`layout.split_key`): the same ids are held out on every machine and run."""
    return bool(L.held_out(np.uint16(L.split_key(sample_id)), fraction))


class Column:
    """One sample array of a store, read when indexed: `column[rows]` (an int, or an integer array in any order,
    optionally followed by indices of the trailing axes: `boxes[r, 0]`). Nothing per sample is held, so a loader
    worker gets it pickled in bytes and reads the rows of its batch. Ids read as str (one) or an array of str.

    A file that is gone (a done shard's) or fails its checksum raises `CacheIntegrityError` naming the array."""

    def __init__(self, store: Location, array: str):
        self.store, self.array, self._handle = store, array, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}

    def __getitem__(self, key):
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        one = np.ndim(rows) == 0
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        if self.array == L.IDS:
            values = self._ids(rows)
        else:
            if self._handle is None:
                self._handle = open_array(self.store, self.array, strict=True)
            what = f"rows {rows.min()}-{rows.max()}" if rows.size else ""
            values = read_rows(self.store, self._handle, self.array, rows, what=what)
        values = values[(slice(None), *rest)] if rest else values
        return values[0] if one else values

    def _ids(self, rows: np.ndarray) -> np.ndarray:
        """zarr-python: tensorstore reads no variable-length strings. The fill value '' is a lost chunk."""
        if self._handle is None:
            self._handle = zarr.open_group(self.store.zarr_store(read_only=True), mode="r")[self.array]
        try:
            values = np.asarray(self._handle.get_coordinate_selection(rows), dtype=object)
        except Exception as e:  # zstd or crc32c of a damaged chunk
            raise CacheIntegrityError(f"{self.array}: a chunk fails to decode ({str(e).splitlines()[0][:120]}); run "
                                      f"`radio-cache verify {self.store} --repair`") from None
        if (values == "").any():
            raise CacheIntegrityError(f"{self.array}: row {int(rows[np.argmax(values == '')])}'s chunk is gone; run "
                                      f"`radio-cache verify {self.store} --repair`, then rerun the same `radio-cache "
                                      "build` to redo its shard")
        return values.astype(str)


def done_rows(done: np.ndarray, shard_size: int, start: int, stop: int) -> np.ndarray:
    """(stop - start,) bool: whether each of rows [start, stop) lies in a done shard (`done`: (shards,) bool)."""
    return np.repeat(done[start // shard_size:-(-stop // shard_size)], shard_size)[start % shard_size:][:stop - start]


class Split:
    """The usable rows of one split of a store ('train' or 'holdout' at `holdout`), ascending, read a block of
    rows (a status chunk and a split-key chunk: STATUS_CHUNK rows) when first needed and kept as bits: nothing is read
    per sample at open, so opening costs the same at 1M and 100M samples.

    The sampler draws from `space` candidates, the rows of the done shards (`row`), and keeps those `contains`
    says are usable rows of the split (status OK, in a done shard, on this side of the split), reading only the
    blocks it draws from. Array-like for everything else (`len`, `split[positions]`, `searchsorted`,
    `np.asarray`): those read every block once (an O(N) pass: the evaluator's and `--epochs`' cost, not the open's).
    `reads` counts the chunks read."""

    def __init__(self, store: Location, *, n: int, shard_size: int, block: int, done: np.ndarray, holdout: float,
                 split: str, keys: np.ndarray | None = None):
        self.store, self.n, self.shard_size, self.holdout, self.split = store, n, shard_size, holdout, split
        self.done = done  # (n_shards,) bool
        self.shards = np.flatnonzero(done)  # the done shards, whose rows are the candidates
        self.space = len(self.shards) * shard_size  # rows past the last sample are candidates, never usable
        self.block = block  # rows of a status chunk: STATUS_CHUNK (v5)
        self.keys = keys  # (N,) uint16 of a store before v5, computed from its ids; else read a block at a time
        self.reads, self._bits, self._counts, self._handles = 0, {}, None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": None}

    @property
    def num_blocks(self) -> int:
        return -(-self.n // self.block)

    def row(self, candidates: np.ndarray) -> np.ndarray:
        """(K,) int64 rows of candidates in [0, space)."""
        return self.shards[candidates // self.shard_size] * self.shard_size + candidates % self.shard_size

    def _mask(self, b: int) -> np.ndarray:
        """(stop - start,) bool: the usable rows of block b that are in the split."""
        return np.unpackbits(self._packed(b), count=min(self.n, (b + 1) * self.block) - b * self.block).view(bool)

    def _packed(self, b: int) -> np.ndarray:
        """(ceil((stop - start) / 8),) uint8: `_mask(b)` as bits, read once."""
        start, stop = b * self.block, min(self.n, (b + 1) * self.block)
        if b not in self._bits:
            flags = done_rows(self.done, self.shard_size, start, stop)
            if not flags.any():  # no done shard in it: nothing to read
                usable = flags
            else:
                if self._handles is None:
                    strict = self.keys is None  # v5: the done state's files must be there
                    self._handles = (open_array(self.store, L.STATUS, strict=strict),
                                     None if self.keys is not None else open_array(self.store, L.SPLIT, strict=True))
                status = read_rows(self.store, self._handles[0], L.STATUS, slice(start, stop))
                keys = (self.keys[start:stop] if self.keys is not None else
                        read_rows(self.store, self._handles[1], L.SPLIT, slice(start, stop), what=f"rows {start}-"))
                self.reads += 1 + (self.keys is None)
                held = L.held_out(keys, self.holdout)
                usable = (status == L.OK) & flags & (held if self.split == "holdout" else ~held)
            self._bits[b] = np.packbits(usable)
        return self._bits[b]

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """(K,) bool: which of (K,) rows are usable rows of the split (reads the blocks not read yet)."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros(len(rows), bool)
        inside = rows < self.n
        for b in np.unique(rows[inside] // self.block).tolist():
            at = np.flatnonzero(inside & (rows // self.block == b))
            offset = rows[at] - b * self.block  # bit 7 - offset % 8 of byte offset // 8 (packbits: big-endian)
            out[at] = (self._packed(b)[offset >> 3] >> (7 - (offset & 7)).astype(np.uint8)) & 1
        return out

    def next_usable(self, rows: np.ndarray) -> np.ndarray:
        """(K,) int64: for each row, the first usable row of the split at or after it, wrapping round."""
        out = np.empty(len(rows), np.int64)
        blocks = self.num_blocks
        for k, r in enumerate(np.asarray(rows, np.int64).tolist()):
            r = r if r < self.n else 0
            for step in range(blocks + 1):
                b = (r // self.block + step) % blocks
                found = np.flatnonzero(self._mask(b)[r - b * self.block if step == 0 else 0:])
                if found.size:
                    out[k] = b * self.block + (r - b * self.block if step == 0 else 0) + found[0]
                    break
            else:
                raise DatasetError("no usable samples to train on (all unreadable, held out, or in unfinished shards)")
        return out

    def at_least(self, count: int) -> bool:
        """Whether the split holds `count` rows or more, reading blocks in order until it is known."""
        if self._counts is not None:
            return len(self) >= count
        found = 0
        for b in range(self.num_blocks):
            found += int(np.count_nonzero(self._mask(b)))
            if found >= count:
                return True
        return False

    def counts(self) -> np.ndarray:
        """(blocks,) int64: rows of the split in each block (reads every block not read yet, two at a time:
        numpy and tensorstore release the GIL)."""
        if self._counts is None:
            blocks = range(self.num_blocks)
            with ThreadPoolExecutor(2) as pool:
                self._counts = np.array(list(pool.map(lambda b: int(np.count_nonzero(self._mask(b))), blocks)),
                                        np.int64)
        return self._counts

    def __len__(self) -> int:
        return int(self.counts().sum())

    def __getitem__(self, positions):
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(len(self)))
        one = np.ndim(positions) == 0
        positions = np.atleast_1d(np.asarray(positions, np.int64))
        ends = np.cumsum(self.counts())
        if positions.size and (positions.min() < 0 or positions.max() >= ends[-1]):
            raise IndexError(f"positions outside the split's {int(ends[-1])} rows")
        blocks = np.searchsorted(ends, positions, side="right")
        out = np.empty(len(positions), np.int64)
        for b in np.unique(blocks).tolist():
            at = blocks == b
            out[at] = b * self.block + np.flatnonzero(self._mask(b))[positions[at] - (ends[b] - self._counts[b])]
        return out[0] if one else out

    def searchsorted(self, values) -> np.ndarray:
        """Position of the first row >= each of `values`."""
        values = np.clip(np.asarray(values, np.int64), 0, self.n)
        before = np.concatenate([[0], np.cumsum(self.counts())])
        blocks = np.minimum(values // self.block, len(before) - 1)
        out = np.where(values < self.n, before[blocks], before[-1])
        for k, (b, v) in enumerate(zip(blocks.tolist(), values.tolist())):
            if v < self.n:
                out[k] += int(np.count_nonzero(self._mask(b)[:v - b * self.block]))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        parts = [np.flatnonzero(self._mask(b)) + b * self.block for b in range(len(self.counts()))]
        out = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return out.astype(dtype or (np.int32 if self.n < 2**31 else np.int64))

    def __iter__(self):
        return iter(self.tolist())

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()


class CacheReader:
    """A store opened for training: teachers, the usable samples of a split, and loaders.

    Opening reads the done flags (a file per 65,536 shards, layout v5; an older store's split keys are computed
    from its ids): no status, split key, id, box or location, and no listing of files. A split's status and keys
    are read when it is used (`Split`), the counts of usable, unreadable and absent samples when asked for (one
    pass over the status). Those are read row by row where they are used (`Column`), and a file that a done shard
    should have is found missing when it is read.

    Args:
        path: the store: a folder or an s3:// URL.
        allow_partial: train on the done shards of an unfinished store.
        images: the image folder, when it moved since the build (default: the root recorded in the store).
        denoise: 'mean': `decode_targets` subtracts each teacher's fixed pattern from its spatial targets
            (`radio-cache pattern`; a store without one is refused here); 'shift': the loader's items also hold
            another view's spatial targets and both boxes (`ViewDataset`), when the store has several views;
            'none' keeps them as stored.
    """

    def __init__(self, path: str | Path, *, allow_partial: bool = False, images: str | Path | None = None,
                 denoise: str = "none"):
        if denoise not in DENOISE:
            raise RadioDistillError(f"--denoise {denoise!r}: choose from {', '.join(DENOISE)}")
        self.path, self.denoise = location(path), denoise
        root = open_store(self.path)
        self.settings = root.attrs["settings"]
        self.views = root.attrs["views"]
        self.shard_size = root.attrs["shard_size"]
        self.images = Images(root.attrs["dataset"], images)
        self.root_dir = self.images.root
        self.classes = list(root.attrs["dataset"]["classes"])
        names = teacher_names(root)
        v5 = root.attrs["layout_version"] >= 5
        done = done_shards(self.path, root, names)
        if not done.all() and not allow_partial:
            raise CacheLayoutError(f"store '{self.path}' is incomplete: {int(done.sum())} of {done.size} shards done; "
                                   "finish it with the same `radio-cache build` command, or pass --allow-partial")
        status = open_array(self.path, L.STATUS, strict=v5)  # its metadata: no chunk read
        self.num_samples, self._block = status.shape[0], status.chunk_layout.read_chunk.shape[0]
        self._done = done
        # a store before v5 has no split keys: computed from every id, the cost a v5 store avoids
        self._keys = None if v5 else np.fromiter(map(L.split_key, root[L.IDS][:].tolist()), np.uint16, self.num_samples)
        self.ids, self.labels, self.boxes = (Column(self.path, a) for a in (L.IDS, L.LABELS, L.BOXES))
        self.locations = Column(self.path, L.LOCATIONS) if L.LOCATIONS in root else None  # (N, 3), `sources.py`
        self.sources = Column(self.path, L.SOURCES) if L.SOURCES in root else None  # (N, 3), `provenance.py`
        self.record = root[L.SHARDS].attrs["arrays"] if L.SHARDS in root else None  # arrays of `samples/shards`
        self.teachers = [self._teacher(self.path, root, name, denoise) for name in names]
        self.pixels = self.settings.get("pixels")  # side of the stored view pixels, or None

    @staticmethod
    def _teacher(path: Location, root, name: str, denoise: str) -> TeacherMeta:
        attrs = root[L.teacher_group(name)].attrs
        arrays = tuple(p for p in L.target_arrays(name) if p in root)
        norm = {}
        transforms = {}
        for target in L.TARGETS:
            if L.norm_array(name, target, "mean") in root:
                norm[target] = {s: read_whole(path, root, L.norm_array(name, target, s)) for s in ("mean", "cov")}
            if L.target_array(name, target) in root and attrs["storage"][target] not in codecs.PLAIN:
                mean, basis = (torch.from_numpy(read_whole(path, root, L.calib_array(name, target, a))).float()
                               for a in ("mean", "basis"))
                transforms[target] = {"cpu": (mean, basis)}
        model = json.dumps({k: v for k, v in attrs["identity"].items() if k not in ("resolution", "tiles")},
                           sort_keys=True)
        pattern = {"cpu": torch.from_numpy(read_pattern(path, root, name)[0])} if denoise == "mean" else {}
        return TeacherMeta(name, attrs["summary_dim"], attrs["spatial_dim"], tuple(attrs["grid"]), arrays, norm,
                           transforms, attrs["resolution"], model, pattern)

    def indices(self, *, holdout: float, split: str = "train") -> Split:
        """Usable sample rows of the 'train' or 'holdout' split (`Split`: nothing read until they are used)."""
        if split not in ("train", "holdout"):
            raise ValueError(f"split {split!r}: 'train' or 'holdout'")
        return Split(self.path, n=self.num_samples, shard_size=self.shard_size, block=self._block, done=self._done,
                     holdout=holdout, split=split, keys=self._keys)

    @cached_property
    def _tally(self) -> tuple[int, int, int]:
        """(usable, unreadable, absent) samples: one pass over the status, a block at a time (O(N): for the
        notes and `radio-cache info`-like counts, never the open)."""
        status, size, block = open_array(self.path, L.STATUS, strict=self._keys is None), self.shard_size, 1 << 23
        usable = unreadable = absent = 0
        for start in range(0, self.num_samples, block):  # 100M bytes of status and flags are not held at once
            values = read_rows(self.path, status, L.STATUS, slice(start, min(self.num_samples, start + block)))
            usable += int(np.count_nonzero((values == L.OK) & done_rows(self._done, size, start, start + len(values))))
            gone = int(np.count_nonzero(values == L.ABSENT))  # rows of an unlisted tar past its samples: no sample
            unreadable += int(np.count_nonzero(values >= L.UNREADABLE)) - gone  # BAD: the codes below ABSENT
            absent += gone
        return usable, unreadable, absent

    @property
    def num_usable(self) -> int:
        return self._tally[0]

    @property
    def unreadable(self) -> int:
        return self._tally[1]

    @property
    def absent(self) -> int:
        return self._tally[2]

    def unusable_note(self) -> str | None:
        """A warning line when fewer than all samples can be trained on (unreadable or missing images,
        unfinished shards), with the count and share; None when all can."""
        n = self.num_samples - self.absent
        bad = n - self.num_usable
        if not bad:
            return None
        pending = bad - self.unreadable
        why = f"{self.unreadable} unreadable or missing images" + (f", {pending} in unfinished shards" if pending else "")
        return (f"warning: {bad} of {n} samples ({bad / n:.1%}) of store '{self.path}' cannot be trained on ({why}); "
                "`radio-cache info` lists them, and a rerun of the build retries missing files")

    def sample_rows(self, indices, count: int, *, shards: int = 32, blocks: int = 2) -> np.ndarray:
        """A seeded sample of about `count` of `indices` (a `Split`, or an ascending array) from `shards` of the
        shards they are in, so that reading their ids, locations or sources reads few chunks; all of them when
        they are few. Of a `Split`, the shards lie in `blocks` of its blocks, whose status and keys alone are
        read: the same cost at 1M and 100M samples."""
        rng = np.random.default_rng(0)
        if isinstance(indices, Split):
            if indices.space <= count:
                return np.asarray(indices)
            size, per = self.shard_size, indices.block // self.shard_size
            chosen = rng.choice(np.unique(indices.shards // per), min(blocks, len(np.unique(indices.shards // per))),
                                replace=False)
            picked = []
            for b in np.sort(chosen).tolist():
                inside = indices.shards[indices.shards // per == b]
                for shard in np.sort(rng.choice(inside, min(len(inside), -(-shards // blocks)), replace=False)).tolist():
                    rows = np.arange(shard * size, min(self.num_samples, (shard + 1) * size))
                    rows = rows[indices.contains(rows)]
                    picked.append(np.sort(rng.choice(rows, min(len(rows), -(-count // shards)), replace=False)))
            return np.concatenate(picked)
        if len(indices) <= count:
            return np.asarray(indices)
        picked = []
        for shard in np.unique(indices[rng.choice(len(indices), shards)] // self.shard_size).tolist():
            lo, hi = np.searchsorted(indices, [shard * self.shard_size, (shard + 1) * self.shard_size])
            take = min(hi - lo, -(-count // shards))
            picked.append(indices[lo + np.sort(rng.choice(hi - lo, take, replace=False))])
        return np.concatenate(picked)

    def check_images(self, indices: np.ndarray, *, resolution: int | None = None) -> None:
        """Fail early, naming a missing image, when the dataset root moved (unless the store holds the
        view pixels at `resolution` (the largest side) or more: then the images are not needed). Looks at a
        seeded sample of about IMAGE_CHECKS images in a few shards (`sample_rows`; all of a small split; tars and
        Parquet: every file, they are few): a file missing later is named when it is read."""
        if self.pixels and resolution is not None and resolution <= self.pixels:
            return
        if not self.root_dir.is_dir():
            raise DatasetError(f"images root '{self.root_dir}' of store '{self.path}' is missing; move the images "
                               "back, or give their new place with --images")
        rows = self.sample_rows(indices if isinstance(indices, Split) else np.asarray(indices), IMAGE_CHECKS)
        ids, locations = self.ids[rows], None if self.locations is None else self.locations[rows]
        missing = self.images.missing(ids, locations)
        if missing:
            raise DatasetError(f"image '{missing}' is missing; the dataset changed since the store was built, "
                               "or lives elsewhere now (--images)")
        if self.sources is not None:
            mask = provenance.changed(self.images, ids, locations, self.sources[rows])
            if mask.any():
                raise DatasetError(f"image '{self.images.root / ids[int(np.argmax(mask))]}' is not the "
                                   f"image the store's targets were computed from ({int(mask.sum())} of "
                                   f"{len(rows)} looked at differ); give the images the store was built from "
                                   "(--images), or rerun `radio-cache build` to redo the changed ones")

    @property
    def pairs(self) -> bool:
        """Whether items pair the student's view with another view of the image (`--denoise shift`; a store of one
        view has none: its loss stays the same-view one)."""
        return self.denoise == "shift" and self.views > 1

    def dataset(self, *, resolution: int) -> "ViewDataset":
        return ViewDataset(self.path, self.images, self.teachers, resolution, pixels=self.pixels,
                           shard_size=self.shard_size, record=self.record, other=self.pairs,
                           columns={"ids": self.ids, "boxes": self.boxes, "locations": self.locations,
                                    "sources": self.sources})

    def loader(self, indices: np.ndarray, *, resolution: int | tuple[int, ...], batch_size: int | tuple[int, ...],
               seed: int, start_step: int, steps: int, policy: str = "random", rank: int = 0, world: int = 1,
               workers: int = 2, pin_memory: bool = False) -> DataLoader:
        """Batches for steps [start_step, steps): rank `rank` of `world` gets its slice of each global batch;
        one loader batch per part of a step (`StepSampler`), each at one resolution.

        A worker's error reaches the caller wrapped in the worker's traceback: `worker_error` unwraps it."""
        sampler = StepSampler(indices, views=self.views, resolution=resolution, batch_size=batch_size, policy=policy,
                              seed=seed, start_step=start_step, steps=steps, rank=rank, world=world, others=self.pairs)
        sides = resolution if isinstance(resolution, tuple) else (resolution,)
        return DataLoader(self.dataset(resolution=sides[0]), batch_sampler=sampler, num_workers=workers,
                          multiprocessing_context="spawn" if workers else None, pin_memory=pin_memory,
                          persistent_workers=bool(workers), prefetch_factor=4 if workers else None)


def worker_error(error: RadioDistillError) -> RadioDistillError:
    """The one-line error a loader worker raised: DataLoader re-raises it with the worker's whole
    traceback as its message, whose last line is 'module.Class: message'."""
    text = str(error).rstrip()
    if "Original Traceback" not in text:
        return error
    return type(error)(text.splitlines()[-1].split(": ", 1)[-1])


class StepSampler(Sampler):
    """Global batches as a pure function of (seed, step): exact resume needs only the step.

    Of an array of rows, each epoch is a seeded permutation of them. Of a `Split` (what `CacheReader.indices`
    gives), each epoch is a seeded permutation of its candidates, the rows of the done shards, read lazily: a
    candidate that is not a usable row of the split (unreadable, absent, on the other side of the split) is
    replaced by a seeded redraw from all candidates, until a usable one comes (after REDRAWS, the next usable
    row in row order). So an epoch of the `space` candidates holds every usable row at least once (at its own
    place) and some twice (as redraws): no longer exactly once. At a 5% hold-out and every sample ok, ~5% of
    an epoch's draws are redraws. The sampler reads a block's status and split keys when it first draws from
    it (`Split`), so the per-sample reading an open did before is spread over the first steps.
    Each item draws one of its V stored views per epoch.

    A step is one part at one side drawn from `resolution` (policy 'random', seeded by
    (seed, step), so every rank draws the same), or, with policy 'partition', one part per entry: the
    global batch's first batch_size[0] items at resolution[0], the next batch_size[1] at resolution[1]...;
    an entry that is a set of sides draws its side each step (seeded by (seed, step, part)).
    Rank r of `world` takes items r, r + world, ... of every part. Yields one list of
    (sample, view, side) per part: a loader batch holds one side. `others` (V > 1): each item also draws another
    of its views, uniformly (sample, view, side, other view).
    """

    def __init__(self, indices, *, views, resolution, batch_size, seed, start_step, steps, policy="random", rank=0,
                 world=1, others=False):
        entries = resolution if isinstance(resolution, tuple) else (resolution,)
        self.sizes = batch_size if isinstance(batch_size, tuple) else (batch_size,)
        self.partition = policy == "partition" and len(entries) > 1
        sets = [e if isinstance(e, tuple) else (e,) for e in entries]
        self.sets = sets if self.partition else [tuple(s for e in sets for s in e)]  # the sides each part draws from
        if len(self.sizes) != len(self.sets):
            raise ValueError(f"batch sizes {self.sizes} do not match sides {entries} under policy {policy!r}")
        for size in self.sizes:
            if size % world:
                raise ValueError(f"global batch {size} is not divisible by {world} processes")
        self.indices = indices if isinstance(indices, Split) else np.asarray(indices)  # a `Split` is read lazily
        if not (indices.at_least(1) if isinstance(indices, Split) else len(indices)):
            raise DatasetError("no usable samples to train on (all unreadable, held out, or in unfinished shards)")
        self.space = indices.space if isinstance(indices, Split) else len(self.indices)  # positions of an epoch
        self.views, self.batch_size, self.seed = views, sum(self.sizes), seed
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self.others = others and views > 1

    def __len__(self) -> int:
        return (self.steps - self.start_step) * len(self.sizes)

    def global_batch(self, step: int) -> list[tuple[int, ...]]:
        """(sample, view[, other view]) of each item of global batch `step`: position p is item p mod n of epoch
        p // n (n: `space`)."""
        n = self.space
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        samples, views = np.empty(len(positions), np.int64), np.empty(len(positions), np.int64)
        others = np.empty(len(positions), np.int64)
        for epoch in np.unique(positions // n).tolist():
            at = positions // n == epoch
            samples[at] = self.draw(positions[at], permute(positions[at] % n, n, (self.seed, epoch)), epoch)
            views[at] = mix(positions[at].astype(np.uint64) ^ _words((self.seed, epoch, VIEW_STREAM))[0]) % self.views
            if self.others:  # one of the V - 1 views that are not the student's
                drawn = mix(positions[at].astype(np.uint64) ^ _words((self.seed, epoch, OTHER_STREAM))[0])
                others[at] = (views[at] + 1 + (drawn % (self.views - 1)).astype(np.int64)) % self.views
        return list(zip(samples.tolist(), views.tolist(), *([others.tolist()] if self.others else [])))

    def draw(self, positions: np.ndarray, candidates: np.ndarray, epoch: int) -> np.ndarray:
        """(K,) rows at (K,) `candidates` of epoch `epoch`, an unusable one redrawn (seeded by its position)."""
        if not isinstance(self.indices, Split):
            return self.indices[candidates]
        rows = self.indices.row(candidates)
        bad = ~self.indices.contains(rows)
        words = _words((self.seed, epoch, REDRAW_STREAM))
        for attempt in range(1, REDRAWS + 1):
            if not bad.any():
                return rows
            drawn = mix(mix(positions[bad].astype(np.uint64) ^ words[0]) ^ np.uint64(attempt) ^ words[1])
            rows[bad] = self.indices.row((drawn % np.uint64(self.space)).astype(np.int64))
            bad[bad] = ~self.indices.contains(rows[bad])
        if bad.any():  # a split of few usable rows: the next one in row order
            rows[bad] = self.indices.next_usable(rows[bad])
        return rows

    def parts(self, step: int) -> list[tuple[int, int]]:
        """(side, global part size) of each part of `step`."""
        out = []
        for k, (sides, size) in enumerate(zip(self.sets, self.sizes)):
            # streams of their own (3 or 4 words: never an epoch's [seed, epoch])
            key = [self.seed, step, SIDE_STREAM] + ([k] if self.partition else [])
            out.append((sides[np.random.default_rng(key).integers(len(sides))] if len(sides) > 1 else sides[0], size))
        return out

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            items, start = self.global_batch(step), 0
            for side, size in self.parts(step):
                yield [(i, v, side, *other) for i, v, *other in items[start:start + size][self.rank::self.world]]
                start += size


SIDE_STREAM = 0x5349  # the random policy's draws: a seed word no epoch permutation uses
VIEW_STREAM = 0x5649  # the views' draws
OTHER_STREAM = 0x4f56  # the other views' draws (`--denoise shift`)
REDRAW_STREAM = 0x5244  # the redraws of unusable candidates
REDRAWS = 64  # redraws before the next usable row is taken: at half the candidates usable, 1 in 10^19 gets there
ROUNDS = 4  # Feistel rounds: enough to shuffle for SGD (not cryptography)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: (K,) uint64 -> (K,) uint64 well-mixed, elementwise (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _words(key: tuple) -> np.ndarray:
    return np.random.default_rng(list(key)).integers(0, 2**63, ROUNDS, dtype=np.uint64)


def permute(positions: np.ndarray, n: int, key: tuple) -> np.ndarray:
    """A seeded permutation of range(n) at `positions` ((K,) in [0, n)), without the (n,) array an epoch's
    shuffle would take (760 MB at 95M samples): a Feistel network on the fewest even bits covering n, walked
    around its cycles until the value is below n again, so it maps range(n) onto itself one to one."""
    half = max(1, -(-max(n - 1, 1).bit_length() // 2))
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = _words(key)
    x = np.asarray(positions).astype(np.uint64)
    walking = np.ones(len(x), bool)
    while walking.any():
        left, right = x[walking] >> shift, x[walking] & mask
        for k in keys:
            left, right = right, left ^ (mix(right ^ k) & mask)
        x[walking] = (left << shift) | right
        walking[walking] = x[walking] >= n
    return x.astype(np.int64)


class ViewDataset(Dataset):
    """Item (sample, view[, side R[, other view]]) -> {'pixels': (3, R, R) uint8, '<array path>': encoded target
    values}; with `other` (`--denoise shift`) and an other view b, also 'other': {'<array path>': b's encoded
    spatial targets} and 'boxes': (2, 4) float32, the boxes of the view and of b (one more spatial read and
    decode per item, nothing per view more).

    R defaults to `resolution`; a batch holds one R. The DataLoader hands a worker a whole batch
    (`__getitems__`): one tensorstore read per array. View pixels stored by the build at side P
    (`pixels`) serve every R <= P, resized from them when smaller (antialiased, like the crop:
    within a few grey levels of a decode, and no JPEG decode); R > P decodes the image, since
    upsampled pixels would miss the detail the image has.
    Raises one line naming the array and the sample for a chunk that fails its checksum, and for
    targets that read as the fill value (all zero: a shard file lost after the shard was done).
    """

    def __init__(self, store: Location, images: Images, teachers: list[TeacherMeta], resolution: int, *,
                 columns: dict, shard_size: int, pixels: int | None = None, record: list[str] | None = None,
                 other: bool = False):
        self.store, self.images = store, images
        self.ids, self.boxes, self.locations, self.sources = (columns[c] for c in ("ids", "boxes", "locations", "sources"))
        self.arrays = [p for t in teachers for p in t.arrays] + ([L.PIXELS] if pixels else [])
        # one per target: its scale when int8 (all zero only where never written), else its values
        self.filled = [L.scale_array(t.name, x) if L.scale_array(t.name, x) in t.arrays else L.target_array(t.name, x)
                       for t in teachers for x in L.TARGETS if L.target_array(t.name, x) in t.arrays]
        self.resolution, self.pixels, self.shard_size, self.record = resolution, pixels, shard_size, record
        spatial = {f(t.name, "spatial") for t in teachers for f in (L.target_array, L.scale_array)}
        self.other = [p for p in self.arrays if p in spatial] if other else []  # read at the other view
        self._handles, self._checked = None, set()

    def __getitem__(self, item: tuple[int, ...]) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, ...]]) -> list[dict]:
        if self._handles is None:  # opened here, inside the (spawned) worker
            self._handles = {p: open_array(self.store, p, strict=True) for p in self.arrays}
        side = items[0][2] if len(items[0]) > 2 else self.resolution
        assert all(len(x) == 2 or x[2] == side for x in items), "a batch holds one side"
        pairs = [(x[0], x[3]) for x in items] if self.other and len(items[0]) > 3 else None  # (sample, other view)
        items = [(i, v) for i, v, *_ in items]
        stored = bool(self.pixels) and side <= self.pixels
        rows = np.array([i for i, _ in items], dtype=np.int64)
        arrays = [p for p in self._handles if p != L.PIXELS or stored]
        self.check_files(rows, arrays + ([] if stored and pairs is None else [L.BOXES])
                         + ([] if stored else [L.IDS, L.LOCATIONS, L.SOURCES]))
        wanted = [(items, arrays)] + ([(pairs, self.other)] if pairs else [])
        reads = [{p: self._handles[p].vindex[rows, np.array([v for _, v in at], np.int64)].read() for p in some}
                 for at, some in wanted]  # concurrent, (B, ...) each
        values, *other = [self._values(read, at) for read, (at, _) in zip(reads, wanted)]
        pixels = values.pop(L.PIXELS, None)
        if pixels is None:
            pixels = self.crops(items, side)
        elif side < self.pixels:
            whole = np.array([0, 0, self.pixels, self.pixels])
            pixels = np.stack([crop_resize(Image.fromarray(p), whole, side) for p in pixels])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, R, R)
        targets = {p: torch.from_numpy(a) for p, a in values.items()}
        out = [{"index": i, "view": v, "pixels": pixels[k], **{p: t[k] for p, t in targets.items()}}
               for k, (i, v) in enumerate(items)]
        if pairs:
            boxes = self.boxes[rows]  # (B, V, 4)
            both = np.stack([boxes[np.arange(len(rows)), [v for _, v in at]] for at in (items, pairs)], 1)  # (B, 2, 4)
            for k, item in enumerate(out):
                item["other"] = {p: torch.from_numpy(a[k]) for p, a in other[0].items()}
                item["boxes"] = torch.from_numpy(both[k])
        return out

    def _values(self, reads: dict, items: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """The arrays of a batch's reads ({path: read}) at (sample, view) `items`, each target checked to be
        written."""
        values = {p: self._result(p, r, items) for p, r in reads.items()}
        for p in self.filled:
            if p not in values:
                continue
            empty = ~values[p].reshape(len(items), -1).view(np.uint8).any(axis=1)
            if empty.any():
                i, v = items[int(np.argmax(empty))]
                raise CacheIntegrityError(f"{p}: sample '{self.ids[i]}' (row {i}, view {v}) reads as all zeros, the "
                                          f"fill value of a chunk never written, although its shard is done; run "
                                          f"`radio-cache verify {self.store} --repair`")
        return values

    def check_files(self, rows: np.ndarray, arrays: list[str]) -> None:
        """The first time a shard is met, its files of `arrays` must have the sizes its build recorded (a file
        swapped with another shard's, or replaced, decodes fine but holds other samples' values): one stat per
        file, instead of a listing of the whole store at open. Stores before layout v4 record nothing."""
        shards = sorted(set((rows // self.shard_size).tolist()) - self._checked)
        if not shards or self.record is None:
            return
        record = read_rows(self.store, open_array(self.store, L.SHARDS), L.SHARDS, np.asarray(shards))  # (k, F, 2)
        for j, array in enumerate(self.record):
            if array not in arrays:
                continue
            meta = self._meta(array)
            for row, k in enumerate(shards):
                want = int(record[row, j, 0])
                key = meta.encode_chunk_key((k,) + (0,) * (len(meta.shape) - 1))
                try:
                    have = self.store.file_size(f"{array}/{key}")
                except (FileNotFoundError, OSError):
                    have = None
                if want == 0 or have != want:
                    why = ("has no integrity record" if want == 0 else "file is gone" if have is None else
                           f"file is {have} bytes, {want} when it was written (cut short, replaced or swapped "
                           "with another shard's)")
                    raise CacheIntegrityError(f"{array}: shard {k} {why}, so its samples would train on wrong values; "
                                              f"run `radio-cache verify {self.store} --repair`, then rerun the same "
                                              "`radio-cache build` to redo it")
        self._checked.update(shards)

    def _meta(self, array: str):
        if not hasattr(self, "_metas"):
            self._metas = {}
        if array not in self._metas:
            self._metas[array] = zarr.open_group(self.store.zarr_store(read_only=True), mode="r")[array].metadata
        return self._metas[array]

    def _result(self, array: str, read, items) -> np.ndarray:
        """The values of a batch read; when a chunk fails (checksum, truncation), names its sample."""
        try:
            return read.result()
        except ValueError as e:
            failed = e
        for i, v in items:  # which sample: read them one by one
            try:
                self._handles[array][i, v].read().result()
            except ValueError as e:
                failed, where = e, f"sample '{self.ids[i]}' (row {i}, view {v})"
                break
        else:
            where = f"rows {min(i for i, _ in items)}-{max(i for i, _ in items)}"
        reason = str(failed).splitlines()[0][:160]
        raise CacheIntegrityError(f"{array}: {where} fails to decode: {reason}; run `radio-cache verify {self.store}`")

    def crop(self, i: int, v: int, side: int | None = None) -> np.ndarray:
        """(R, R, 3) uint8: the view decoded from the original image at `side` (default: `resolution`)."""
        return self.crops([(i, v)], side)[0]

    def crops(self, items: list[tuple[int, int]], side: int | None = None) -> np.ndarray:
        """(B, R, R, 3) uint8: views (sample, view) decoded from the original images at `side` (default:
        `resolution`); the images of a batch are read together (`Images.read`)."""
        side = side or self.resolution
        rows = np.array([i for i, _ in items], np.int64)
        ids = self.ids[rows]
        boxes = self.boxes[rows][np.arange(len(rows)), [v for _, v in items]]  # (B, 4)
        digests = None if self.sources is None else self.sources[rows, 2]
        payloads = self.images.read(ids, None if self.locations is None else self.locations[rows])
        out = []
        for k, ((i, v), payload) in enumerate(zip(items, payloads)):
            try:
                if payload is None:
                    raise UnreadableImage("no image member")
                data, (_, _, digest) = provenance.read_image(payload)
                if isinstance(data, UnreadableImage):
                    raise data
                if digests is not None and digest != digests[k]:
                    raise DatasetError(f"image '{self.images.root / ids[k]}' (sample {i}) is not the image its "
                                       "targets were computed from (its bytes changed since the build); give the "
                                       "images the store was built from (--images), or rerun `radio-cache build`")
                image, span, _ = load_rgb(data, min_side=side)
            except UnreadableImage as e:
                raise DatasetError(f"image '{self.images.root / ids[k]}' (sample {i}) became unreadable: {e}") from None
            out.append(crop_resize(image, boxes[k], side, span=span))
        return np.stack(out)


def decode_targets(batch: dict, teachers: list[TeacherMeta], device: torch.device) -> dict:
    """Encoded batch arrays -> {teacher: {'summary': (B, D) | None, 'spatial': (B, h, w, C)}} float32 on `device`,
    the spatial targets less their teacher's fixed pattern where `TeacherMeta.pattern` holds one (on the
    stored grid, the decoded targets' own, pooled or not).

    A calibrated codec's transform and a pattern are copied to `device` once and kept in the `TeacherMeta`."""
    out = {}
    for t in teachers:
        out[t.name] = {}
        for target in L.TARGETS:
            values = batch.get(L.target_array(t.name, target))
            if values is None:
                out[t.name][target] = None
                continue
            scale = batch.get(L.scale_array(t.name, target))
            scale = None if scale is None else scale.to(device, non_blocking=True)
            placed = t.transforms.get(target)
            if placed is not None and str(device) not in placed:
                placed[str(device)] = tuple(x.to(device) for x in placed["cpu"])
            transform = None if placed is None else placed[str(device)]
            out[t.name][target] = codecs.decode(values.to(device, non_blocking=True), scale, transform)
        if t.pattern and out[t.name]["spatial"] is not None:
            if str(device) not in t.pattern:
                t.pattern[str(device)] = t.pattern["cpu"].to(device)
            out[t.name]["spatial"] = out[t.name]["spatial"] - t.pattern[str(device)]
    return out
