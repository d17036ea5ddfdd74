"""A teacher's fixed pattern as a store holds it (`radio-cache pattern` writes it): read, checked, measured.

ViT teachers add position-fixed artifacts to their patch tokens (NVlabs/RADIO #174); the pattern of a
teacher is, per position of its stored grid, the mean of its decoded spatial targets minus their mean over
all positions (`pattern/offset`), with the variance about that mean (`pattern/var`).

Letters: h, w the teacher's stored grid, C its spatial channels.
"""

import math

import numpy as np
import zarr

from ..errors import CacheIntegrityError, RadioDistillError
from . import layout as L
from .group import read_whole
from .location import Location


def has_pattern(root: zarr.Group, teacher: str) -> bool:
    return all(L.pattern_array(teacher, s) in root for s in L.PATTERN)


def read_pattern(path: Location, root: zarr.Group, teacher: str) -> tuple[np.ndarray, np.ndarray]:
    """(offset, var), each (h, w, C) float32, checked (`read_whole`) and of the teacher's stored grid and width.

    Raises:
        RadioDistillError: the store holds none for `teacher` (naming the pass that makes it).
        CacheIntegrityError: an array gone, altered, of another shape, or not finite (var also >= 0)."""
    if not has_pattern(root, teacher):
        raise RadioDistillError(f"store '{path}' holds no fixed-pattern estimate of teacher '{teacher}'; run "
                                f"`radio-cache pattern {path}` first")
    attrs = root[L.teacher_group(teacher)].attrs
    shape = (*attrs["grid"], attrs["spatial_dim"])
    offset, var = (read_whole(path, root, L.pattern_array(teacher, s)) for s in L.PATTERN)
    for stat, values in zip(L.PATTERN, (offset, var)):
        if values.shape != shape or not np.isfinite(values).all() or (stat == "var" and values.min() < 0):
            what = "not finite or negative" if stat == "var" else "not finite"
            raise CacheIntegrityError(f"{L.pattern_array(teacher, stat)}: shape {values.shape} (the teacher's grid "
                                      f"and width: {shape}) or values {what}; run `radio-cache pattern {path}` again")
    return offset, var


def pattern_strength(offset: np.ndarray, var: np.ndarray, samples: int) -> dict:
    """{'ratio': the pattern's RMS over the RMS of the tokens about their mean over all positions, i.e. the
    square root of the share of the token variance that the grid position explains; 'noise': the same ratio
    of the estimate's sampling error, sqrt(var / samples) (views of one image are not independent, so
    samples, not maps): a ratio near it is not told from chance}."""
    pattern = float((offset.astype(np.float64) ** 2).sum(-1).mean())
    within = float(var.astype(np.float64).sum(-1).mean())
    total = max(pattern + within, 1e-30)
    return {"ratio": math.sqrt(pattern / total), "noise": math.sqrt(within / max(samples, 1) / total)}
