"""timm models as student backbones: ViTs with summary tokens, and anything with a feature map.

Shapes: B batch, H, W input pixels, h, w the patch / feature grid, P prefix tokens, S summary
tokens, D model width.
"""

from __future__ import annotations

import timm
import torch
from timm.models import is_model_in_modules, split_model_name_tag
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import UnknownStudentError
from .model import IMAGENET_MEAN, IMAGENET_STD, Student, TeacherDims, check_input, make_student


def _norm_cfg(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


class TimmViT(nn.Module):
    """A timm VisionTransformer whose prefix tokens are summary tokens, then registers.

    Built without a class token and with ``num_summary + num_registers`` register tokens, so
    teacher i's summary token is prefix token i. ``dynamic_img_size`` lets any multiple of the
    patch size through (the position embedding is resampled).

    Args:
        name: timm model name.
        num_summary: summary tokens, one per teacher with a summary target.
        num_registers: extra register tokens (no target).
        pretrained: load timm's pretrained weights (downloads; off by default).
        **kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, name: str, *, num_summary: int, num_registers: int = 4,
                 pretrained: bool = False, **kwargs):
        super().__init__()
        if pretrained:  # timm's loader resamples pos_embed for a class token this layout replaces
            raise ValueError(f"pretrained=True is not supported for ViT student '{name}': its prefix tokens "
                             "are summary and register tokens, not timm's class token")
        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, global_pool="", dynamic_img_size=True,
            class_token=False, reg_tokens=num_summary + num_registers, **kwargs)
        self.label, self.num_summary = name, num_summary
        ph, pw = self.model.patch_embed.patch_size
        assert ph == pw, "non-square patches are not supported"
        self.input_stride = ph
        self.feature_info = {"num_chs": self.model.embed_dim, "reduction": ph}
        self.mean, self.std = _norm_cfg(self.model)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.input_stride, self.label)
        B, _, H, W = x.shape
        p, P = self.input_stride, self.model.num_prefix_tokens
        tokens = self.model.forward_features(x)  # (B, P + h * w, D)
        patches = tokens[:, P:]
        # no summary teachers: the mean patch token stands in as the backbone summary
        summary = tokens[:, : self.num_summary] if self.num_summary else patches.mean(1, keepdim=True)
        spatial = patches.transpose(1, 2).reshape(B, -1, H // p, W // p)  # (B, D, h, w)
        return summary, spatial


class TimmMap(nn.Module):
    """Any timm model whose ``forward_features`` is a feature map (ConvNeXt, ResNet, ...).

    The summary is the global average of the last map, shared by all teachers' summary heads.

    Args:
        name: timm model name.
        num_summary: ignored (maps have one pooled summary); kept for a uniform builder call.
        pretrained: load timm's pretrained weights (downloads; off by default).
        **kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, name: str, *, num_summary: int = 0, pretrained: bool = False, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="",
                                       **kwargs)
        self.label = name
        # some families (Swin, ...) return channels-last maps
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        side = kwargs.get("img_size") or self.model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        shape, unused = _trace_features(self.model, (side, side) if isinstance(side, int) else tuple(side))
        if len(shape) != 4:
            raise UnknownStudentError(f"timm model '{name}' cannot be a student: its forward_features gives a "
                                      f"{tuple(shape)} tensor, not a (B, D, h, w) feature map; choose a ViT of "
                                      "timm's vision_transformer family, a CNN or an E-RADIO size")
        for module in unused:  # head parts (conv_head, norm_head...): DDP refuses parameters that get no gradient
            self.model.set_submodule(module, nn.Identity())
        self.input_stride = int(self.model.feature_info[-1]["reduction"])
        self.feature_info = {"num_chs": self.model.num_features, "reduction": self.input_stride}
        self.mean, self.std = _norm_cfg(self.model)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.input_stride, self.label)
        spatial = self.model.forward_features(x)
        if self.nhwc:
            spatial = spatial.permute(0, 3, 1, 2)
        return spatial.mean((2, 3)).unsqueeze(1), spatial  # (B, 1, D), (B, D, h, w)


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


def _trace_features(model: nn.Module, size: tuple[int, int]) -> tuple[torch.Size, list[str]]:
    """The output shape of ``model.forward_features`` on a (2, 3, H, W) batch in the model's current
    mode, and the top-most submodules none of whose parameters it uses (what forward_head alone
    needs), from one forward and backward on the meta device: no memory, no compute.
    """
    params = {n: torch.empty_like(p, device="meta").requires_grad_() for n, p in model.named_parameters()}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    x = torch.empty(2, 3, *size, device="meta")  # 2: BatchNorm refuses one value per channel in training
    out = functional_call(_ForwardFeatures(model), {f"model.{n}": t for n, t in {**params, **buffers}.items()}, (x,))
    grads = torch.autograd.grad(out.float().sum(), list(params.values()), allow_unused=True)
    unused = {n for n, g in zip(params, grads) if g is None}
    drop = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(d + ".") for d in drop):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and unused.issuperset(names):
            drop.append(name)
    return out.shape, drop


def build_timm_student(name: str, *, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """A ``Student`` on timm model ``name``: the ViT path for timm VisionTransformers, else a map.

    Args:
        name: timm model name (a pretrained tag such as ``.augreg_in21k`` is allowed).
        teachers: ``{name: TeacherDims}``.
        **overrides: head options of ``make_student``, ``num_registers`` (ViTs), ``pretrained``
            and any ``timm.create_model`` keyword.

    Returns:
        the ``Student``.
    """
    is_vit = is_model_in_modules(split_model_name_tag(name)[0], ["vision_transformer"])
    return make_student(TimmViT if is_vit else TimmMap, teachers, name=name, **overrides)
