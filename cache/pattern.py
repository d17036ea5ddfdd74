"""`radio-cache pattern`: estimate each teacher's fixed pattern over the whole cache and store it.

The pattern (`store/pattern.py`) is, per position of a teacher's stored grid, the mean of its decoded
spatial targets minus their mean over all positions, with the variance there; `radio-train --denoise
mean` subtracts it from every target. Every stored view counts: each is one teacher input, and the
pattern is tied to the teacher's grid, not to the image. The random crops of views 1.. also spread the
images' own layout (objects centred, sky on top) over the grid; what a dataset keeps of it is estimated
with the pattern, and subtracted with it.

Cost: one read of the spatial targets of every view of every usable sample (of N samples spread evenly
over the dataset with `samples`), no image and no teacher; memory: two float64 (h, w, C) sums per
teacher and one block of decoded targets (`BLOCK_BYTES`). Nothing is written until every teacher's
sums are complete; a rerun replaces the arrays.

Letters: B samples in a block, V views, h, w the stored grid, C spatial channels, k stored channels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import RadioDistillError
from ..progress import Progress
from ..store import codecs
from ..store import layout as L
from ..store.group import open_array, open_store, read_rows, write_whole
from ..store.pattern import pattern_strength
from ..store.reader import CacheReader

BLOCK_BYTES = 64 << 20  # decoded float32 targets of one block, all teachers


def estimate_patterns(store: str | Path, *, samples: int | None = None, progress: bool = False) -> dict:
    """Estimate and write every teacher's `pattern/offset` and `pattern/var` (`layout.py`).

    Args:
        store: a complete store (a folder or an s3:// URL).
        samples: read only this many usable samples, spread evenly over the dataset (default: all).

    Returns:
        {'store', 'samples', 'views', 'seconds', 'teachers': {name: {'grid', 'ratio', 'noise'}}}
        (`pattern_strength`).

    Raises:
        RadioDistillError: `samples` below 1, a store that is not one, incomplete, or without usable samples.
    """
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise RadioDistillError(f"--samples {samples!r}: must be a whole number >= 1")
    start = time.perf_counter()
    reader = CacheReader(store)
    rows = np.asarray(reader.indices(holdout=0.0))  # every usable sample
    if not len(rows):
        raise RadioDistillError(f"store '{reader.path}' has no usable sample to estimate a pattern from")
    if samples is not None and samples < len(rows):
        rows = rows[np.unique(np.linspace(0, len(rows) - 1, samples).round().astype(np.int64))]
    teachers, views = reader.teachers, reader.views
    for t in teachers:
        if L.target_array(t.name, "spatial") not in t.arrays:
            raise RadioDistillError(f"store '{reader.path}': teacher '{t.name}' has no spatial target to estimate "
                                    "a pattern of")
    arrays = [a for t in teachers for a in (L.target_array(t.name, "spatial"), L.scale_array(t.name, "spatial"))
              if a in t.arrays]
    handles = {a: open_array(reader.path, a, strict=True) for a in arrays}
    sums = {t.name: np.zeros((*t.grid, t.spatial_dim)) for t in teachers}
    squares = {t.name: np.zeros((*t.grid, t.spatial_dim)) for t in teachers}
    per_sample = 4 * views * sum(t.grid[0] * t.grid[1] * t.spatial_dim for t in teachers)
    block = max(1, BLOCK_BYTES // per_sample)
    dataset = reader.dataset(resolution=1)  # for its check of each shard's files against their record
    with Progress("pattern", total=len(rows), unit="samples", enabled=progress) as bar:
        for at in range(0, len(rows), block):
            part = rows[at:at + block]
            dataset.check_files(part, arrays)
            read = {a: torch.from_numpy(read_rows(reader.path, handles[a], a, part, what=f"rows {part[0]}-{part[-1]}"))
                    for a in arrays}
            for t in teachers:
                scale = read.get(L.scale_array(t.name, "spatial"))
                placed = t.transforms.get("spatial")
                x = codecs.decode(read[L.target_array(t.name, "spatial")], scale,
                                  None if placed is None else placed["cpu"]).flatten(0, 1)  # (B * V, h, w, C)
                sums[t.name] += x.sum(0, dtype=torch.float64).numpy()
                squares[t.name] += (x * x).sum(0, dtype=torch.float64).numpy()
            bar.advance(len(part))
    maps = len(rows) * views
    root = open_store(reader.path, mode="r+")
    out = {}
    for t in teachers:
        mean = sums[t.name] / maps
        var = np.maximum(squares[t.name] / maps - mean * mean, 0.0)  # rounding may dip below 0 where var ~ 0
        offset = (mean - mean.mean((0, 1))).astype(np.float32)
        var = var.astype(np.float32)
        group = root.require_group(L.pattern_group(t.name))
        for stat, value in zip(L.PATTERN, (offset, var)):
            write_whole(root, L.pattern_array(t.name, stat), value, overwrite=True)
        group.attrs.update({
            "samples": int(len(rows)), "maps": int(maps), "grid": list(t.grid), "resolution": t.resolution,
            "created_by": f"radio-distill {__version__}"})
        out[t.name] = {"grid": list(t.grid), **pattern_strength(offset, var, len(rows))}
    return {"store": str(reader.path), "samples": int(len(rows)), "views": views,
            "seconds": time.perf_counter() - start, "teachers": out}
