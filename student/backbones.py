"""timm models as student backbones: ViTs with summary tokens, and anything with a feature map.

Shapes: B batch, H, W input pixels, h, w the patch / feature grid, P prefix tokens, S summary
tokens, D model width.
"""

from __future__ import annotations

import timm
from timm.models import is_model_in_modules, split_model_name_tag
from torch import Tensor, nn

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
        if hasattr(self.model, "head"):  # forward_features never reaches it; DDP refuses unused parameters
            self.model.head = nn.Identity()
        self.label = name
        # some families (Swin, ...) return channels-last maps
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.input_stride = int(self.model.feature_info[-1]["reduction"])
        self.feature_info = {"num_chs": self.model.num_features, "reduction": self.input_stride}
        self.mean, self.std = _norm_cfg(self.model)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.input_stride, self.label)
        spatial = self.model.forward_features(x)
        if self.nhwc:
            spatial = spatial.permute(0, 3, 1, 2)
        assert spatial.ndim == 4, f"{self.label} does not return a (B, D, h, w) feature map"
        return spatial.mean((2, 3)).unsqueeze(1), spatial  # (B, 1, D), (B, D, h, w)


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
