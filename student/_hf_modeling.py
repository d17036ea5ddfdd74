"""A radio-distill student for Hugging Face transformers, behind RADIO's interface.

    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)
    out = model(x)   # x: (B, 3, H, W) in [0, 1], H and W multiples of model.min_resolution_step
    summary, features = out["clip"]   # (B, Dt), (B, N, Ct); out["backbone"] too; feature_fmt="NCHW" for (B, C, h, w)
    # a teacher's head with upsample u (config "heads") gives u h x u w tokens

Written by radio_distill's `radio-export RUN OUT --format hf`; it needs torch, timm and transformers, not
radio_distill (E-RADIO's code is copied in below). Shapes: B batch, H, W pixels, h, w the student grid,
N = h * w, D backbone width, S summary tokens, Dt / Ct a teacher's summary / spatial width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

# <inline> radio_distill.student.hf replaces this block with the source of the names it imports
from .eradio import (AttnStage, Block, Bottleneck, C2f, ConvBN, ERadio, ERadioCfg,  # noqa: F401
                     MultiResAttention, WindowAttention, window_size)
from .model import IMAGENET_MEAN, IMAGENET_STD, MLP2, check_input  # noqa: F401
# </inline>

FEATURE_FMTS = ("NLC", "NCHW")


class Resolution(NamedTuple):
    height: int
    width: int


class RadioOutput(NamedTuple):
    summary: Tensor | None  # (B, S * D) backbone, (B, Dt) adaptor; None for a teacher without a summary (SAM)
    features: Tensor  # (B, N, C) with feature_fmt 'NLC', (B, C, h, w) with 'NCHW'


class InputConditioner(nn.Module):
    """``(x - mean) / std`` for pixels ``x`` (B, 3, H, W) in [0, 1]."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)


class TimmViTBackbone(nn.Module):
    """A timm ViT whose prefix tokens are one summary token per summary teacher, then registers."""

    def __init__(self, spec: dict):
        super().__init__()
        self.model = timm.create_model(spec["model"], pretrained=False, **spec["kwargs"])
        self.num_summary, self.stride = spec["num_summary"], spec["input_stride"]
        if spec.get("cpe"):  # the training crops' state: kept so the weights load as they were saved
            self.register_buffer("cpe_state", torch.zeros(2, dtype=torch.long))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, _, H, W = x.shape
        tokens = self.model.forward_features(x)  # (B, P + h * w, D)
        patches = tokens[:, self.model.num_prefix_tokens:]
        summary = tokens[:, : self.num_summary] if self.num_summary else patches.mean(1, keepdim=True)
        return summary, patches.transpose(1, 2).reshape(B, -1, H // self.stride, W // self.stride)


class TimmMapBackbone(nn.Module):
    """A timm model whose forward_features is a feature map; the summary is its mean."""

    def __init__(self, spec: dict):
        super().__init__()
        self.model = timm.create_model(spec["model"], pretrained=False, **spec["kwargs"])
        for name in spec["dropped"]:  # head parts the student never used
            self.model.set_submodule(name, nn.Identity())
        self.nhwc = spec["nhwc"]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        spatial = self.model.forward_features(x)
        if self.nhwc:
            spatial = spatial.permute(0, 3, 1, 2)
        return spatial.mean((2, 3)).unsqueeze(1), spatial  # (B, 1, D), (B, D, h, w)


def build_backbone(spec: dict) -> nn.Module:
    if spec["kind"] == "eradio":
        backbone = ERadio(ERadioCfg(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["cfg"].items()}))
        return backbone.switch_to_deploy() if spec["deployed"] else backbone
    return {"timm_vit": TimmViTBackbone, "timm_map": TimmMapBackbone}[spec["kind"]](spec)


class RadioStudentConfig(PretrainedConfig):
    """config.json as `radio-export --format hf` writes it: ``backbone`` (how to rebuild it), ``heads``
    ({teacher: {'summary': [in, hidden, out] | None, 'spatial': [...]}}), ``head_blocks``,
    ``head_pre_norm``, ``mean``, ``std``, ``patch_size``, ``min_resolution_step``,
    ``preferred_resolution`` and ``feature_fmt``."""

    model_type = "radio_distill_student"


class RadioStudentModel(PreTrainedModel):
    """The student: backbone + one summary and one spatial adaptor head per teacher, RADIO's interface."""

    config_class = RadioStudentConfig
    main_input_name = "pixel_values"

    def __init__(self, config: RadioStudentConfig):
        super().__init__(config)
        heads, blocks, pre_norm = config.heads, config.head_blocks, config.head_pre_norm
        with torch.device("cpu"):  # real tensors even inside from_pretrained's meta-device context (see _init_weights)
            self.backbone = build_backbone(config.backbone)
            self.summary_heads = nn.ModuleDict({t: MLP2(*h["summary"], num_blocks=blocks, pre_norm=pre_norm)
                                                for t, h in heads.items() if h["summary"]})
            self.spatial_heads = nn.ModuleDict({t: MLP2(*h["spatial"], num_blocks=blocks, pre_norm=pre_norm)
                                                for t, h in heads.items()})
            self.input_conditioner = InputConditioner(config.mean, config.std)
        # buffers the weights file does not hold (the conditioner's mean and std, timm's relative position
        # indices...): from_pretrained empties them and asks _init_weights for them, so each module keeps its own
        for module in self.modules():
            persistent = set(module.state_dict(keep_vars=True))
            module._fixed_buffers = {n: b.detach().clone() for n, b in module.named_buffers(recurse=False)
                                     if n not in persistent}
        self.adaptor_names = list(heads)
        self.upsample = {t: h.get("upsample", 1) for t, h in heads.items()}
        self.patch_size = config.patch_size
        self.min_resolution_step = config.min_resolution_step
        self.preferred_resolution = Resolution(config.preferred_resolution, config.preferred_resolution)
        self.feature_fmt = config.feature_fmt
        self._external = False
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the file; the buffers it does not hold get back their values."""
        for name, value in getattr(module, "_fixed_buffers", {}).items():
            getattr(module, name).copy_(value)

    def get_nearest_supported_resolution(self, height: int, width: int) -> Resolution:
        """Each side rounded to the nearest multiple of ``min_resolution_step``, at least that step."""
        step = self.min_resolution_step
        return Resolution(*(max(step, int(round(s / step)) * step) for s in (height, width)))

    def make_preprocessor_external(self) -> InputConditioner:
        """From now on ``forward`` takes normalised pixels; returns the conditioner that normalises them."""
        self._external = True
        return self.input_conditioner

    def forward(self, pixel_values: Tensor, feature_fmt: str | None = None) -> dict[str, RadioOutput]:
        """``{'backbone': RadioOutput, teacher: RadioOutput, ...}`` of pixels (B, 3, H, W) in [0, 1]."""
        fmt = feature_fmt or self.feature_fmt
        if fmt not in FEATURE_FMTS:
            raise ValueError(f"feature_fmt {fmt!r}: choose from {', '.join(FEATURE_FMTS)}")
        step, (H, W) = self.min_resolution_step, pixel_values.shape[-2:]
        if H % step or W % step:
            raise ValueError(f"input {H}x{W}: both sides must be multiples of {step}; "
                             f"get_nearest_supported_resolution({H}, {W}) = {self.get_nearest_supported_resolution(H, W)}")
        x = pixel_values if self._external else self.input_conditioner(pixel_values)
        summary, spatial = self.backbone.forward_features(x)  # (B, S, D), (B, D, h, w)
        B, _, h, w = spatial.shape
        tokens = spatial.flatten(2).transpose(1, 2)  # (B, N, D)
        out = {"backbone": RadioOutput(summary.flatten(1), tokens if fmt == "NLC" else spatial)}
        i = 0
        for name in self.adaptor_names:
            s = None
            if name in self.summary_heads:  # one token per summary teacher when the backbone has them
                s = self.summary_heads[name](summary[:, i if summary.shape[1] > 1 else 0])
                i += 1
            f, u = self.spatial_heads[name](tokens), self.upsample[name]  # (B, N, Ct u²)
            if u > 1:  # (B, u² N, Ct): u tokens per student token a side
                f = F.pixel_shuffle(f.transpose(1, 2).reshape(B, -1, h, w), u).flatten(2).transpose(1, 2)
            out[name] = RadioOutput(s, f if fmt == "NLC" else f.transpose(1, 2).reshape(B, -1, u * h, u * w))
        return out
