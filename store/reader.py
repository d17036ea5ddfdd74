"""The one module through which training reads a store: metadata, the split, and a DataLoader.

Each item is one (sample, view): the view's box cropped from the original image and resized to
the student resolution (uint8) — or, when the build stored view pixels at that resolution
(`--pixels`), those, with no JPEG decode — plus that view's stored targets for every teacher,
still encoded.
Decoding (int8 x scale, then for a calibrated codec one matmul with its stored basis, plus the mean)
happens on the training device. Loader workers are spawned (zarr and
tensorstore threads deadlock after fork) and open their tensorstore handles inside the worker;
they read a whole batch with one tensorstore read per array.

Sized for ImageNet-scale stores (1.28M samples): the sample arrays are read with tensorstore
(thousands of small chunks), the split is vectorised, sample ids travel to workers as one bytes
buffer, and the image check looks at a seeded sample of the files (a file missing later is named
when it is read). Images in tars or Parquet files are read by their stored locations: a member's
bytes at its offset, a Parquet row from its row group; no tar is scanned.

Letters: N samples, B batch, R student side, V views, h, w teacher grid, C channels, D summary dims.
"""

import functools
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CacheIntegrityError, CacheLayoutError, DatasetError, RadioDistillError
from . import codecs
from . import layout as L
from . import provenance
from .dataset import UnreadableImage, load_rgb
from .group import lost_shards, open_array, open_store, read_whole, teacher_names
from .location import Location, location
from .sources import Images
from .views import crop_resize

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


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Deterministic split by sample id: the same ids are held out on every machine and run."""
    return zlib.crc32(sample_id.encode()) / 2**32 < fraction


class SampleIds:
    """Sample ids as one fixed-width UTF-8 bytes array; `ids[i]` is the id string.

    A spawned loader worker receives it as one buffer (1.28M ImageNet ids: 41 MB, pickled in
    milliseconds), where an object array of Python strings is ~110 MB and slow to pickle.
    """

    def __init__(self, ids):
        self.data = np.array([i.encode() for i in np.asarray(ids).tolist()], dtype=np.bytes_)  # (N,) bytes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        """The id of row `i` (str), or of rows `i` (an array of str)."""
        picked = self.data[i]
        return picked.decode() if isinstance(picked, bytes) else np.strings.decode(picked, "utf-8")

    @functools.cached_property
    def crc32(self) -> np.ndarray:
        """(N,) uint32 crc32 of each id's UTF-8 bytes."""
        return np.fromiter(map(zlib.crc32, self.data.tolist()), np.uint32, len(self.data))

    def held_out(self, fraction: float) -> np.ndarray:
        """(N,) bool: `is_held_out` of every id, vectorised."""
        return self.crc32 / 2**32 < fraction


class CacheReader:
    """A store opened for training: teachers, the usable samples of a split, and loaders.

    Args:
        path: the store: a folder or an s3:// URL.
        allow_partial: train on the done shards of an unfinished store.
        images: the image folder, when it moved since the build (default: the root recorded in the store).
    """

    def __init__(self, path: str | Path, *, allow_partial: bool = False, images: str | Path | None = None):
        self.path = location(path)
        root = open_store(self.path)
        self.settings = root.attrs["settings"]
        self.views = root.attrs["views"]
        self.images = Images(root.attrs["dataset"], images)
        self.root_dir = self.images.root
        self.classes = list(root.attrs["dataset"]["classes"])
        names = teacher_names(root)
        # tensorstore reads the many small chunks of these arrays concurrently (zarr-python: one at a time)
        arrays = [L.LABELS, L.BOXES, L.STATUS] + [L.done_array(name) for name in names]
        arrays += [a for a in (L.LOCATIONS, L.SOURCES) if a in root]
        reads = dict(zip(arrays, [open_array(self.path, a).read() for a in arrays]))

        def whole(array: str, read):  # a chunk failing its checksum or decompression is named, as targets' are
            try:
                return read()
            except (ValueError, RuntimeError) as e:
                raise CacheIntegrityError(f"{array}: a chunk fails to decode ({str(e).splitlines()[0][:160]}); run "
                                          f"`radio-cache verify {self.path}`") from None

        self.ids = SampleIds(whole(L.IDS, lambda: root[L.IDS][:]))
        values = {a: whole(a, r.result) for a, r in reads.items()}
        self.labels, self.boxes, status = (values[a] for a in (L.LABELS, L.BOXES, L.STATUS))
        self.locations = values.get(L.LOCATIONS)  # (N, 3), `sources.py`
        self.sources = values.get(L.SOURCES)  # (N, 3), `provenance.py`
        done = np.logical_and.reduce([values[L.done_array(name)] == 1 for name in names])
        if not done.all() and not allow_partial:
            raise CacheLayoutError(f"store '{self.path}' is incomplete: {int(done.sum())} of {done.size} shards done; "
                                   "finish it with the same `radio-cache build` command, or pass --allow-partial")
        gone = lost_shards(self.path, root)
        if gone:
            (array, shard, why), more = gone[0], f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            raise CacheIntegrityError(f"store '{self.path}': {array} shard {shard} {why}{more}, so its samples would "
                                      "train on wrong values; rerun the same `radio-cache build` command to redo it")
        size, n = root.attrs["shard_size"], root.attrs["num_samples"]
        self.usable = np.repeat(done, size)[:n] & (status == L.OK)
        self.unreadable = int((status == L.UNREADABLE).sum())
        self.teachers = [self._teacher(self.path, root, name) for name in names]
        self.pixels = self.settings.get("pixels")  # side of the stored view pixels, or None

    @staticmethod
    def _teacher(path: Location, root, name: str) -> TeacherMeta:
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
        model = json.dumps({k: v for k, v in attrs["identity"].items() if k != "resolution"}, sort_keys=True)
        return TeacherMeta(name, attrs["summary_dim"], attrs["spatial_dim"], tuple(attrs["grid"]), arrays, norm,
                           transforms, attrs["resolution"], model)

    def indices(self, *, holdout: float, split: str = "train") -> np.ndarray:
        """Usable sample indices of the 'train' or 'holdout' split."""
        held = self.ids.held_out(holdout)
        return np.flatnonzero(self.usable & (held if split == "holdout" else ~held))

    def unusable_note(self) -> str | None:
        """A warning line when fewer than all samples can be trained on (unreadable or missing images,
        unfinished shards), with the count and share; None when all can."""
        n, bad = len(self.usable), int((~self.usable).sum())
        if not bad:
            return None
        pending = bad - self.unreadable
        why = f"{self.unreadable} unreadable or missing images" + (f", {pending} in unfinished shards" if pending else "")
        return (f"warning: {bad} of {n} samples ({bad / n:.1%}) of store '{self.path}' cannot be trained on ({why}); "
                "`radio-cache info` lists them, and a rerun of the build retries missing files")

    def check_images(self, indices: np.ndarray, *, resolution: int | None = None) -> None:
        """Fail early, naming a missing image, when the dataset root moved (unless the store holds the
        view pixels at `resolution` (the largest side) or more: then the images are not needed). Looks at a
        seeded sample of IMAGE_CHECKS files (all of a small split): a file missing later is named when it is read."""
        if self.pixels and resolution is not None and resolution <= self.pixels:
            return
        if not self.root_dir.is_dir():
            raise DatasetError(f"images root '{self.root_dir}' of store '{self.path}' is missing; move the images "
                               "back, or give their new place with --images")
        if len(indices) > IMAGE_CHECKS and not self.images.packed:  # tars, Parquet: every file, they are few
            indices = np.sort(np.random.default_rng(0).choice(indices, IMAGE_CHECKS, replace=False))
        missing = self.images.missing(self.ids[indices], None if self.locations is None else self.locations[indices])
        if missing:
            raise DatasetError(f"image '{missing}' is missing; the dataset changed since the store was built, "
                               "or lives elsewhere now (--images)")
        if self.sources is not None:
            if len(indices) > IMAGE_CHECKS:  # tars, Parquet: hashing every image would read the dataset
                indices = np.sort(np.random.default_rng(0).choice(indices, IMAGE_CHECKS, replace=False))
            mask = provenance.changed(self.images, self.ids[indices], None if self.locations is None
                                      else self.locations[indices], self.sources[indices])
            if mask.any():
                raise DatasetError(f"image '{self.images.root / self.ids[int(indices[np.argmax(mask)])]}' is not the "
                                   f"image the store's targets were computed from ({int(mask.sum())} of "
                                   f"{len(indices)} looked at differ); give the images the store was built from "
                                   "(--images), or rerun `radio-cache build` to redo the changed ones")

    def dataset(self, *, resolution: int) -> "ViewDataset":
        return ViewDataset(self.path, self.images, self.ids, self.boxes, self.teachers, resolution,
                           pixels=self.pixels, locations=self.locations,
                           digests=None if self.sources is None else self.sources[:, 2])

    def loader(self, indices: np.ndarray, *, resolution: int | tuple[int, ...], batch_size: int | tuple[int, ...],
               seed: int, start_step: int, steps: int, policy: str = "random", rank: int = 0, world: int = 1,
               workers: int = 2, pin_memory: bool = False) -> DataLoader:
        """Batches for steps [start_step, steps): rank `rank` of `world` gets its slice of each global batch;
        one loader batch per part of a step (`StepSampler`), each at one resolution.

        A worker's error reaches the caller wrapped in the worker's traceback: `worker_error` unwraps it."""
        sampler = StepSampler(indices, views=self.views, resolution=resolution, batch_size=batch_size, policy=policy,
                              seed=seed, start_step=start_step, steps=steps, rank=rank, world=world)
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

    Each epoch is a seeded permutation of the samples; each sample draws one of its V stored views
    per epoch. A step is one part at one side drawn from `resolution` (policy 'random', seeded by
    (seed, step), so every rank draws the same), or, with policy 'partition', one part per side: the
    global batch's first batch_size[0] items at resolution[0], the next batch_size[1] at resolution[1]...
    Rank r of `world` takes items r, r + world, ... of every part. Yields one list of
    (sample, view, side) per part: a loader batch holds one side.
    """

    def __init__(self, indices, *, views, resolution, batch_size, seed, start_step, steps, policy="random", rank=0,
                 world=1):
        self.sides = resolution if isinstance(resolution, tuple) else (resolution,)
        self.sizes = batch_size if isinstance(batch_size, tuple) else (batch_size,)
        self.partition = policy == "partition" and len(self.sides) > 1
        if len(self.sizes) != (len(self.sides) if self.partition else 1):
            raise ValueError(f"batch sizes {self.sizes} do not match sides {self.sides} under policy {policy!r}")
        for size in self.sizes:
            if size % world:
                raise ValueError(f"global batch {size} is not divisible by {world} processes")
        if len(indices) == 0:
            raise DatasetError("no usable samples to train on (all unreadable, held out, or in unfinished shards)")
        self.indices, self.views, self.batch_size, self.seed = np.asarray(indices), views, sum(self.sizes), seed
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._epochs = {}

    def __len__(self) -> int:
        return (self.steps - self.start_step) * len(self.sizes)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, view per position) of an epoch; the last two are kept (a batch may straddle two)."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs = {e: v for e, v in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = (self.indices[rng.permutation(len(self.indices))],
                                   rng.integers(0, self.views, len(self.indices)))
        return self._epochs[epoch]

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        n, out = len(self.indices), []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            order, views = self._epoch(pos // n)
            out.append((int(order[pos % n]), int(views[pos % n])))
        return out

    def parts(self, step: int) -> list[tuple[int, int]]:
        """(side, global part size) of each part of `step`."""
        if self.partition:
            return list(zip(self.sides, self.sizes))
        if len(self.sides) == 1:
            return [(self.sides[0], self.sizes[0])]
        # a stream of its own (3 words: never an epoch's [seed, epoch])
        pick = np.random.default_rng([self.seed, step, SIDE_STREAM]).integers(len(self.sides))
        return [(self.sides[pick], self.sizes[0])]

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            items, start = self.global_batch(step), 0
            for side, size in self.parts(step):
                yield [(i, v, side) for i, v in items[start:start + size][self.rank::self.world]]
                start += size


SIDE_STREAM = 0x5349  # the random policy's draws: a seed word no epoch permutation uses


class ViewDataset(Dataset):
    """Item (sample, view[, side R]) -> {'pixels': (3, R, R) uint8, '<array path>': encoded target values}.

    R defaults to `resolution`; a batch holds one R. The DataLoader hands a worker a whole batch
    (`__getitems__`): one tensorstore read per array. View pixels stored by the build at side P
    (`pixels`) serve every R <= P, resized from them when smaller (antialiased, like the crop:
    within a few grey levels of a decode, and no JPEG decode); R > P decodes the image, since
    upsampled pixels would miss the detail the image has.
    Raises one line naming the array and the sample for a chunk that fails its checksum, and for
    targets that read as the fill value (all zero: a shard file lost after the shard was done).
    """

    def __init__(self, store: Location, images: Images, ids: SampleIds, boxes, teachers: list[TeacherMeta],
                 resolution: int, *, pixels: int | None = None, locations: np.ndarray | None = None,
                 digests: np.ndarray | None = None):
        self.store, self.images, self.ids, self.boxes, self.locations = store, images, ids, boxes, locations
        self.digests = digests  # (N,) int64 of the image bytes each sample's targets came from (`provenance.py`)
        self.arrays = [p for t in teachers for p in t.arrays] + ([L.PIXELS] if pixels else [])
        # one per target: its scale when int8 (all zero only where never written), else its values
        self.filled = [L.scale_array(t.name, x) if L.scale_array(t.name, x) in t.arrays else L.target_array(t.name, x)
                       for t in teachers for x in L.TARGETS if L.target_array(t.name, x) in t.arrays]
        self.resolution, self.pixels = resolution, pixels
        self._handles = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, ...]) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, ...]]) -> list[dict]:
        if self._handles is None:  # opened here, inside the (spawned) worker
            self._handles = {p: open_array(self.store, p) for p in self.arrays}
        side = items[0][2] if len(items[0]) > 2 else self.resolution
        assert all(len(x) == 2 or x[2] == side for x in items), "a batch holds one side"
        items = [(i, v) for i, v, *_ in items]
        stored = bool(self.pixels) and side <= self.pixels
        rows, views = (np.array(c, dtype=np.int64) for c in zip(*items))
        reads = {p: h.vindex[rows, views].read() for p, h in self._handles.items()  # concurrent, (B, ...) each
                 if p != L.PIXELS or stored}
        values = {p: self._result(p, r, items) for p, r in reads.items()}
        for p in self.filled:
            empty = ~values[p].reshape(len(items), -1).view(np.uint8).any(axis=1)
            if empty.any():
                i, v = items[int(np.argmax(empty))]
                raise CacheIntegrityError(f"{p}: sample '{self.ids[i]}' (row {i}, view {v}) reads as all zeros, the "
                                          f"fill value of a chunk never written, although its shard is done; run "
                                          f"`radio-cache verify {self.store}`")
        pixels = values.pop(L.PIXELS, None)
        if pixels is None:
            pixels = self.crops(items, side)
        elif side < self.pixels:
            whole = np.array([0, 0, self.pixels, self.pixels])
            pixels = np.stack([crop_resize(Image.fromarray(p), whole, side) for p in pixels])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, R, R)
        targets = {p: torch.from_numpy(a) for p, a in values.items()}
        return [{"index": i, "view": v, "pixels": pixels[k], **{p: t[k] for p, t in targets.items()}}
                for k, (i, v) in enumerate(items)]

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
        rows = [i for i, _ in items]
        payloads = self.images.read(self.ids[rows], None if self.locations is None else self.locations[rows])
        out = []
        for (i, v), payload in zip(items, payloads):
            try:
                if payload is None:
                    raise UnreadableImage("no image member")
                data, (_, _, digest) = provenance.read_image(payload)
                if isinstance(data, UnreadableImage):
                    raise data
                if self.digests is not None and digest != self.digests[i]:
                    raise DatasetError(f"image '{self.images.root / self.ids[i]}' (sample {i}) is not the image its "
                                       "targets were computed from (its bytes changed since the build); give the "
                                       "images the store was built from (--images), or rerun `radio-cache build`")
                image, span, _ = load_rgb(data, min_side=side)
            except UnreadableImage as e:
                raise DatasetError(f"image '{self.images.root / self.ids[i]}' (sample {i}) became unreadable: {e}") from None
            out.append(crop_resize(image, self.boxes[i, v], side, span=span))
        return np.stack(out)


def decode_targets(batch: dict, teachers: list[TeacherMeta], device: torch.device) -> dict:
    """Encoded batch arrays -> {teacher: {'summary': (B, D) | None, 'spatial': (B, h, w, C)}} float32 on `device`.

    A calibrated codec's transform is copied to `device` once and kept in `TeacherMeta.transforms`."""
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
    return out
