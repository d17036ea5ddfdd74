"""The one module through which training reads a store: metadata, the split, and a DataLoader.

Each item is one (sample, view): the view's box cropped from the original image and resized to
the student resolution (uint8) — or, when the build stored view pixels at that resolution
(`--pixels`), those, with no JPEG decode — plus that view's stored targets for every teacher,
still encoded.
Decoding (int8 x scale) happens on the training device. Loader workers are spawned (zarr and
tensorstore threads deadlock after fork) and open their tensorstore handles inside the worker.

Letters: B batch, R student side, V views, h, w teacher grid, C channels, D summary dims.
"""

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..cache import codecs
from ..cache import layout as L
from ..cache.dataset import UnreadableImage, load_rgb
from ..cache.store import done_shards, open_array, open_store, teacher_names
from ..cache.views import crop_resize
from ..errors import CacheLayoutError, DatasetError


@dataclass(frozen=True)
class TeacherMeta:
    """What training needs to know of one teacher, read from its attrs and norm arrays."""

    name: str
    summary_dim: int | None
    spatial_dim: int
    grid: tuple[int, int]
    arrays: tuple[str, ...]  # target and scale arrays present
    norm: dict  # {'summary'|'spatial': {'mean': (C,), 'cov': (C, C)}} float64 numpy


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Deterministic split by sample id: the same ids are held out on every machine and run."""
    return zlib.crc32(sample_id.encode()) / 2**32 < fraction


class CacheReader:
    """A store opened for training: teachers, the usable samples of a split, and loaders."""

    def __init__(self, path: str | Path, *, allow_partial: bool = False):
        self.path = Path(path).expanduser().resolve()
        root = open_store(self.path)
        self.settings = root.attrs["settings"]
        self.views = root.attrs["views"]
        self.root_dir = Path(root.attrs["dataset"]["root"])
        self.classes = list(root.attrs["dataset"]["classes"])
        names = teacher_names(root)
        done = done_shards(root, names)
        if not done.all() and not allow_partial:
            raise CacheLayoutError(f"store '{self.path}' is incomplete: {int(done.sum())} of {done.size} shards done; "
                                   "finish it with the same `radio-cache build` command, or pass --allow-partial")
        size, n = root.attrs["shard_size"], root.attrs["num_samples"]
        in_done = np.repeat(done, size)[:n]
        self.ids = np.asarray(root[L.IDS][:], dtype=object)
        self.labels = root[L.LABELS][:]
        self.boxes = root[L.BOXES][:]
        self.usable = in_done & (root[L.STATUS][:] == L.OK)
        self.teachers = [self._teacher(root, name) for name in names]
        self.pixels = self.settings.get("pixels")  # side of the stored view pixels, or None

    @staticmethod
    def _teacher(root, name: str) -> TeacherMeta:
        attrs = root[L.teacher_group(name)].attrs
        arrays = tuple(p for t in L.TARGETS for p in (L.target_array(name, t), L.scale_array(name, t)) if p in root)
        norm = {}
        for target in L.TARGETS:
            if L.norm_array(name, target, "mean") in root:
                norm[target] = {s: root[L.norm_array(name, target, s)][...] for s in ("mean", "cov")}
        return TeacherMeta(name, attrs["summary_dim"], attrs["spatial_dim"], tuple(attrs["grid"]), arrays, norm)

    def indices(self, *, holdout: float, split: str = "train") -> np.ndarray:
        """Usable sample indices of the 'train' or 'holdout' split."""
        held = np.array([is_held_out(i, holdout) for i in self.ids], dtype=bool)
        return np.flatnonzero(self.usable & (held if split == "holdout" else ~held))

    def check_images(self, indices: np.ndarray, *, resolution: int | None = None) -> None:
        """Fail early, naming the first missing image, when the dataset root moved (unless the store
        holds the view pixels at `resolution`: then the images are not needed)."""
        if self.pixels == resolution:
            return
        if not self.root_dir.is_dir():
            raise DatasetError(f"images root '{self.root_dir}' of store '{self.path}' is missing; "
                               "move the images back or rebuild the store from their new place")
        for i in indices:
            if not (self.root_dir / self.ids[i]).is_file():
                raise DatasetError(f"image '{self.root_dir / self.ids[i]}' (sample {i}) is missing; "
                                   "the dataset changed since the store was built")

    def dataset(self, *, resolution: int) -> "ViewDataset":
        return ViewDataset(self.path, self.root_dir, self.ids, self.boxes, self.teachers, resolution,
                           stored_pixels=self.pixels == resolution)

    def loader(self, indices: np.ndarray, *, resolution: int, batch_size: int, seed: int, start_step: int,
               steps: int, rank: int = 0, world: int = 1, workers: int = 2, pin_memory: bool = False) -> DataLoader:
        """Batches for steps [start_step, steps): rank `rank` of `world` gets its slice of each global batch."""
        sampler = StepSampler(indices, views=self.views, batch_size=batch_size, seed=seed, start_step=start_step,
                              steps=steps, rank=rank, world=world)
        return DataLoader(self.dataset(resolution=resolution), batch_sampler=sampler, num_workers=workers,
                          multiprocessing_context="spawn" if workers else None, pin_memory=pin_memory,
                          persistent_workers=bool(workers), prefetch_factor=4 if workers else None)


class StepSampler(Sampler):
    """Global batches as a pure function of (seed, step): exact resume needs only the step.

    Each epoch is a seeded permutation of the samples; each sample draws one of its V stored views
    per epoch. Rank r of `world` takes items r, r + world, ... of every global batch.
    """

    def __init__(self, indices, *, views, batch_size, seed, start_step, steps, rank=0, world=1):
        if batch_size % world:
            raise ValueError(f"global batch {batch_size} is not divisible by {world} processes")
        if len(indices) == 0:
            raise DatasetError("no usable samples to train on (all unreadable, held out, or in unfinished shards)")
        self.indices, self.views, self.batch_size, self.seed = np.asarray(indices), views, batch_size, seed
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world
        self._epochs = {}

    def __len__(self) -> int:
        return self.steps - self.start_step

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

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield self.global_batch(step)[self.rank::self.world]


class ViewDataset(Dataset):
    """Item (sample, view) -> {'pixels': (3, R, R) uint8, '<array path>': encoded target values}."""

    def __init__(self, store: Path, root_dir: Path, ids, boxes, teachers: list[TeacherMeta], resolution: int, *,
                 stored_pixels: bool = False):
        self.store, self.root_dir, self.ids, self.boxes = store, root_dir, ids, boxes
        self.arrays = [p for t in teachers for p in t.arrays] + ([L.PIXELS] if stored_pixels else [])
        self.resolution = resolution
        self._handles = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        i, v = item
        if self._handles is None:  # opened here, inside the (spawned) worker
            self._handles = {p: open_array(self.store, p) for p in self.arrays}
        reads = {p: h[i, v].read() for p, h in self._handles.items()}  # concurrent tensorstore reads
        out = {"index": i, "view": v}
        for p, r in reads.items():
            out[p] = torch.from_numpy(np.ascontiguousarray(r.result()))
        pixels = out.pop(L.PIXELS, None)
        if pixels is None:
            pixels = torch.from_numpy(self.crop(i, v))
        out["pixels"] = pixels.permute(2, 0, 1)
        return out

    def crop(self, i: int, v: int) -> np.ndarray:
        """(R, R, 3) uint8: the view decoded from the original image."""
        path = self.root_dir / self.ids[i]
        try:
            image, span, _ = load_rgb(path, min_side=self.resolution)
        except UnreadableImage as e:
            raise DatasetError(f"image '{path}' (sample {i}) became unreadable: {e}") from None
        return crop_resize(image, self.boxes[i, v], self.resolution, span=span)


def decode_targets(batch: dict, teachers: list[TeacherMeta], device: torch.device) -> dict:
    """Encoded batch arrays -> {teacher: {'summary': (B, D) | None, 'spatial': (B, h, w, C)}} float32 on `device`."""
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
            out[t.name][target] = codecs.decode(values.to(device, non_blocking=True), scale)
    return out
