"""The student: one backbone plus an adaptor head per teacher, RADIO-style.

Shapes: B batch, H, W input pixels, h, w the student grid (H / reduction), D backbone width,
S summary tokens from the backbone, N = h * w grid tokens, Dt a teacher's summary width,
Ct a teacher's spatial width.

A backbone is any module with
  - ``forward_features(x)`` mapping ``(B, 3, H, W)`` to ``(summary (B, S, D), spatial (B, D, h, w))``;
    S is either one token per summary teacher (ViTs, in teacher order) or 1, shared by all
    teachers (pooled CNN / E-RADIO maps);
  - ``feature_info`` ``{'num_chs': D, 'reduction': H // h}``, ``input_stride`` (inputs must be a
    multiple of it), ``mean`` and ``std`` (the pixel normalisation it expects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherDims:
    """What a student must predict for one teacher.

    Args:
        summary_dim: width of the teacher's summary vector; None if it has none (SAM).
        spatial_dim: channels of the teacher's spatial feature map.
        upsample: the spatial head predicts upsample x upsample tokens per student token (pixel shuffle):
            its map is that much finer than the student grid, for a teacher whose grid is finer
            (a bilinear upsampling cannot draw the edges SAM's decoder needs).
    """

    summary_dim: int | None
    spatial_dim: int
    upsample: int = 1


class Features(NamedTuple):
    summary: Tensor | None  # (B, D) or (B, Dt); None for teachers without a summary
    spatial: Tensor  # (B, C, h, w) at the student grid; a teacher's adaptor map (B, Ct, u h, u w), u its upsample


class StudentOutput(NamedTuple):
    backbone: Features  # summary (B, S * D), spatial (B, D, h, w)
    teachers: dict[str, Features]  # per teacher: summary (B, Dt) | None, spatial (B, Ct, u h, u w)


def check_input(x: Tensor, stride: int, what: str) -> None:
    """Raises ValueError unless both sides of ``x`` (B, 3, H, W) are multiples of ``stride``."""
    H, W = x.shape[-2:]
    if H % stride or W % stride:
        raise ValueError(f"{what} needs an input side divisible by {stride}, got {H}x{W}")


class MLP2(nn.Module):
    """RADIO's "MLP v2" adaptor, applied to the last dim of (..., in_dim).

    pre-norm (LayerNorm, GELU) -> fc1 -> blocks of x + Linear(GELU(LayerNorm(x)))
    -> final LayerNorm, GELU, Linear. The residual blocks let the head deepen without
    losing the identity path from fc1.

    Args:
        in_dim: input width.
        hidden_dim: width of fc1 and the residual blocks.
        out_dim: output width.
        num_blocks: number of residual blocks.
        pre_norm: apply LayerNorm + GELU to the input first.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, num_blocks: int = 1,
                 pre_norm: bool = True):
        super().__init__()
        self.pre_norm = nn.Sequential(nn.LayerNorm(in_dim), nn.GELU()) if pre_norm else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim))
            for _ in range(num_blocks)
        )
        self.final = nn.Sequential(nn.LayerNorm(hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(self.pre_norm(x))
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


class Student(nn.Module):
    """Backbone + per-teacher summary and spatial adaptor heads.

    Args:
        backbone: a module following the backbone contract in the module docstring.
        teachers: ``{name: TeacherDims}``; order fixes which summary token serves which teacher.
        head_hidden: hidden width of every head; None uses max(D, teacher width).
        head_blocks: residual blocks per head.
        head_pre_norm: LayerNorm + GELU on the head input.
    """

    def __init__(self, backbone: nn.Module, teachers: dict[str, TeacherDims], *,
                 head_hidden: int | None = None, head_blocks: int = 1, head_pre_norm: bool = True):
        super().__init__()
        self.backbone = backbone
        self.teachers = dict(teachers)
        self.feature_info = dict(backbone.feature_info)
        self.input_stride = int(backbone.input_stride)
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        self.name, self.overrides, self.deployed = type(backbone).__name__, {}, False
        self.preferred_resolution: int | None = None  # the side it was trained at (radio-train sets it)
        D = self.feature_info["num_chs"]

        def head(width: int, out: int) -> MLP2:  # hidden as wide as the teacher's features, not its upsampled output
            hidden = head_hidden or max(D, width)
            return MLP2(D, hidden, out, num_blocks=head_blocks, pre_norm=head_pre_norm)

        self.summary_heads = nn.ModuleDict(
            {t: head(d.summary_dim, d.summary_dim) for t, d in self.teachers.items() if d.summary_dim is not None})
        self.spatial_heads = nn.ModuleDict(
            {t: head(d.spatial_dim, d.spatial_dim * d.upsample ** 2) for t, d in self.teachers.items()})

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features of normalised pixels ``x`` (B, 3, H, W).

        Returns:
            summary tokens (B, S, D) and the spatial map (B, D, h, w).
        """
        return self.backbone.forward_features(x)

    def forward(self, x: Tensor) -> StudentOutput:
        """Backbone and adaptor outputs of normalised pixels ``x`` (B, 3, H, W).

        Returns:
            ``StudentOutput``; spatial maps are channels-first at the student grid (h, w), a teacher's
            at its upsample times that.
        """
        summary, spatial = self.forward_features(x)  # (B, S, D), (B, D, h, w)
        B, _, h, w = spatial.shape
        tokens = spatial.flatten(2).transpose(1, 2)  # (B, N, D)
        out, i = {}, 0
        for name in self.teachers:
            s = None
            if name in self.summary_heads:
                # one token per summary teacher when the backbone has them, else the shared one
                s = self.summary_heads[name](summary[:, i if summary.shape[1] > 1 else 0])
                i += 1
            f = self.spatial_heads[name](tokens).transpose(1, 2).reshape(B, -1, h, w)  # (B, Ct u², h, w)
            u = self.teachers[name].upsample
            out[name] = Features(s, F.pixel_shuffle(f, u) if u > 1 else f)  # (B, Ct, u h, u w)
        return StudentOutput(Features(summary.flatten(1), spatial), out)

    def switch_to_deploy(self) -> "Student":
        """Fold BatchNorms into convolutions where the backbone supports it (E-RADIO)."""
        if hasattr(self.backbone, "switch_to_deploy"):
            self.backbone.switch_to_deploy()
            self.deployed = True
        return self


def make_student(backbone_fn: Callable[..., nn.Module], teachers: dict[str, TeacherDims], *,
                 head_hidden: int | None = None, head_blocks: int = 1, head_pre_norm: bool = True,
                 **backbone_kwargs) -> Student:
    """Builds ``backbone_fn(num_summary=..., **backbone_kwargs)`` and wraps it with heads.

    Args:
        backbone_fn: callable returning a backbone; told how many summary teachers there are.
        teachers: ``{name: TeacherDims}``.
        head_hidden: see ``Student``.
        head_blocks: see ``Student``.
        head_pre_norm: see ``Student``.
        **backbone_kwargs: passed to ``backbone_fn``.

    Returns:
        the ``Student``.
    """
    num_summary = sum(d.summary_dim is not None for d in teachers.values())
    backbone = backbone_fn(num_summary=num_summary, **backbone_kwargs)
    return Student(backbone, teachers, head_hidden=head_hidden, head_blocks=head_blocks,
                   head_pre_norm=head_pre_norm)


def as_teacher_dims(teachers: dict) -> dict[str, TeacherDims]:
    """Accepts TeacherDims, ``{'summary_dim', 'spatial_dim'[, 'upsample']}`` dicts or pairs per teacher."""
    out = {}
    for name, d in teachers.items():
        if isinstance(d, dict):
            d = TeacherDims(**d)
        elif not isinstance(d, TeacherDims):
            d = TeacherDims(*d)
        out[str(name)] = d
    return out


__all__ = ["TeacherDims", "Features", "StudentOutput", "MLP2", "Student", "make_student"]
