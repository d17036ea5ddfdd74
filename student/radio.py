"""RADIO's published interface on a student: pixels in [0, 1] in, ``(summary, features)`` per adaptor out.

The same calling convention as NVlabs/RADIO's ``RADIOModel`` (facts of its interface, our own code):
normalisation inside (an input conditioner, unless ``make_preprocessor_external`` hands it out),
``patch_size``, ``min_resolution_step``, ``preferred_resolution`` and
``get_nearest_supported_resolution``; the output is a dict with a ``backbone`` entry and one per
adaptor (teacher), each a ``RadioOutput(summary, features)``, features NLC or NCHW.

Shapes: B batch, H, W input pixels, h, w the student grid, N = h * w, D backbone width, S summary
tokens, Dt / Ct a teacher's summary / spatial width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .model import Student

FEATURE_FMTS = ("NLC", "NCHW")
DEFAULT_SIDE = 224  # the preferred side of a student with no trained or configured one


class Resolution(NamedTuple):
    height: int
    width: int


class RadioOutput(NamedTuple):
    summary: Tensor | None  # (B, S * D) backbone, (B, Dt) adaptor; None for a teacher without a summary (SAM)
    features: Tensor  # (B, N, C) with feature_fmt 'NLC', (B, C, h, w) with 'NCHW'


class InputConditioner(nn.Module):
    """``(x - mean) / std`` for pixels ``x`` (B, 3, H, W) in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def preferred_side(student: Student) -> int:
    """The side a student was trained at (recorded by `radio-train`), else its backbone's default input
    side (timm's pretrained config), else 224; a multiple of its input stride."""
    side = student.preferred_resolution
    if side is None:
        cfg = getattr(getattr(student.backbone, "model", None), "pretrained_cfg", None) or {}
        side = int(cfg.get("input_size", (3, DEFAULT_SIDE, DEFAULT_SIDE))[-1])
    step = student.input_stride
    return max(step, round(side / step) * step)


def nearest_resolution(height: int, width: int, step: int) -> Resolution:
    """Each side rounded to the nearest multiple of ``step``, at least ``step``."""
    return Resolution(*(max(step, int(round(s / step)) * step) for s in (height, width)))


class RadioStudent(nn.Module):
    """A ``Student`` behind RADIO's interface.

    Args:
        student: the student; it stays reachable as ``.student`` (its own forward takes normalised pixels).
        feature_fmt: the default layout of spatial features, 'NLC' (RADIO's default) or 'NCHW'.
    """

    def __init__(self, student: Student, *, feature_fmt: str = "NLC"):
        super().__init__()
        _check_fmt(feature_fmt)
        self.student = student
        self.input_conditioner = InputConditioner(student.mean, student.std)
        self.feature_fmt = feature_fmt
        self.patch_size = int(student.feature_info["reduction"])  # input pixels per feature cell
        self.min_resolution_step = int(student.input_stride)  # every input side is a multiple of it
        side = preferred_side(student)
        self.preferred_resolution = Resolution(side, side)
        self.adaptor_names = list(student.teachers)
        self.embed_dim = int(student.feature_info["num_chs"])
        self._external = False

    def get_nearest_supported_resolution(self, height: int, width: int) -> Resolution:
        """The supported input size closest to (height, width): each side a multiple of ``min_resolution_step``."""
        return nearest_resolution(height, width, self.min_resolution_step)

    def make_preprocessor_external(self) -> InputConditioner:
        """From now on ``forward`` takes already normalised pixels; returns the conditioner that normalises them."""
        self._external = True
        return self.input_conditioner

    def forward(self, x: Tensor, feature_fmt: str | None = None) -> dict[str, RadioOutput]:
        """Backbone and adaptor outputs of pixels ``x`` (B, 3, H, W) in [0, 1] (normalised ones after
        ``make_preprocessor_external``); H and W multiples of ``min_resolution_step``.

        Returns:
            ``{'backbone': RadioOutput, teacher: RadioOutput, ...}`` in the student's teacher order.
        """
        fmt = feature_fmt or self.feature_fmt
        _check_fmt(fmt)
        out = self.student(x if self._external else self.input_conditioner(x))
        items = [("backbone", out.backbone)] + list(out.teachers.items())
        return {name: RadioOutput(f.summary, _layout(f.spatial, fmt)) for name, f in items}


def _layout(spatial: Tensor, fmt: str) -> Tensor:
    """(B, C, h, w) -> itself for 'NCHW', (B, h * w, C) for 'NLC'."""
    return spatial if fmt == "NCHW" else spatial.flatten(2).transpose(1, 2)


def _check_fmt(fmt: str) -> None:
    if fmt not in FEATURE_FMTS:
        raise ValueError(f"feature_fmt {fmt!r}: choose from {', '.join(FEATURE_FMTS)}")
