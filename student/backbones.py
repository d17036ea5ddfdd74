"""timm models as student backbones: ViTs with summary tokens, and anything with a feature map.

Shapes: B batch, H, W input pixels, h, w the patch / feature grid, P prefix tokens, S summary
tokens, D model width.
"""

from __future__ import annotations

import math

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import is_model_in_modules, split_model_name_tag
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import RadioDistillError, UnknownStudentError
from ..layers import ConvPatchEmbed
from .model import IMAGENET_MEAN, IMAGENET_STD, Student, TeacherDims, check_input, make_student


def _norm_cfg(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


class TimmViT(nn.Module):
    """A timm VisionTransformer whose prefix tokens are summary tokens, then registers.

    Built without a class token and with ``num_summary + num_registers`` register tokens, so
    teacher i's summary token is prefix token i. ``dynamic_img_size`` lets any multiple of the
    patch size through (the position embedding is resampled).

    With ``cpe_size`` the position embedding is RADIO's CPE (cropped position embedding): a learned
    grid of a ``cpe_size`` image's patches (no entries for prefix tokens). In training, each forward
    adds a random crop of it (side 0.32-1 of the grid, aspect 3/4-4/3) resized to the input grid, so
    no input size owns fixed positions; the crops are a pure function of (a seed drawn at creation,
    the forwards so far), both kept in the ``cpe_state`` buffer, so a resumed run draws the same
    ones. In eval mode the whole grid is resized to the input grid (timm's own resampling, so the
    timm export computes the same).

    Args:
        name: timm model name.
        num_summary: summary tokens, one per teacher with a summary target.
        num_registers: extra register tokens (no target).
        cpe_size: the image side whose patch grid the CPE table holds (e.g. 1024); None: timm's own.
        pretrained: load timm's pretrained weights (downloads; off by default).
        **kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, name: str, *, num_summary: int, num_registers: int = 4, cpe_size: int | None = None,
                 pretrained: bool = False, **kwargs):
        super().__init__()
        if pretrained:  # timm's loader resamples pos_embed for a class token this layout replaces
            raise ValueError(f"pretrained=True is not supported for ViT student '{name}': its prefix tokens "
                             "are summary and register tokens, not timm's class token")
        if cpe_size is not None:
            if isinstance(cpe_size, bool) or not isinstance(cpe_size, int) or cpe_size < 1:
                raise _bad_cpe(cpe_size, name)
            kwargs.update(img_size=cpe_size, no_embed_class=True)
        self.model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, global_pool="", dynamic_img_size=True,
            class_token=False, reg_tokens=num_summary + num_registers, **kwargs)
        self.label, self.timm_name, self.num_summary = name, name, num_summary
        ph, pw = self.model.patch_embed.patch_size
        assert ph == pw, "non-square patches are not supported"
        self.input_stride = ph
        self.feature_info = {"num_chs": self.model.embed_dim, "reduction": ph}
        self.mean, self.std = _norm_cfg(self.model)
        self.conv_stem = isinstance(self.model.patch_embed, ConvPatchEmbed)  # ours: plain timm cannot build it
        if cpe_size is not None:
            if cpe_size < ph or cpe_size % ph:
                raise _bad_cpe(cpe_size, name, ph)
            # [seed, forwards so far]; mirrored in self._cpe so a forward never waits for the device
            self.register_buffer("cpe_state", torch.tensor([int(torch.randint(2**31, ())), 0]))
            self._cpe = self.cpe_state.tolist()
            self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_cpe", module.cpe_state.tolist()))
            self.model._pos_embed = self._cropped_pos_embed  # timm's forward_features calls it

    def _cropped_pos_embed(self, x: Tensor) -> Tensor:
        """Patch tokens (B, h, w, D) -> prefix and patch tokens (B, P + h * w, D) with CPE positions."""
        vit = self.model
        if not self.training:
            return type(vit)._pos_embed(vit, x)
        B, h, w, D = x.shape
        gh, gw = vit.patch_embed.grid_size
        table = vit.pos_embed.reshape(1, gh, gw, D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        u = np.random.default_rng(self._cpe).random(4)
        self._cpe[1] += 1
        self.cpe_state[1].fill_(self._cpe[1])
        scale, aspect = CPE_MIN_SCALE + (1 - CPE_MIN_SCALE) * u[0], math.exp((2 * u[1] - 1) * math.log(4 / 3))
        sx, sy = min(1.0, scale * aspect), min(1.0, scale / aspect)  # crop sides, fractions of the grid
        x0, y0 = u[2] * (1 - sx), u[3] * (1 - sy)
        xs = x0 + sx * (torch.arange(w, device=x.device) + 0.5) / w  # cell centres in [0, 1]
        ys = y0 + sy * (torch.arange(h, device=x.device) + 0.5) / h
        where = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1) * 2 - 1  # (h, w, 2) as (x, y) in [-1, 1]
        pos = F.grid_sample(table, where[None].to(table.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)  # (1, D, h, w)
        tokens = x.reshape(B, h * w, D) + pos.flatten(2).transpose(1, 2)
        prefix = [t.expand(B, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        return vit.pos_drop(torch.cat(prefix + [tokens], 1))

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


CPE_MIN_SCALE = math.sqrt(0.1)  # RADIO's: a crop covers at least 10% of the grid's area


def _bad_cpe(cpe_size, name: str, patch: int | None = None) -> RadioDistillError:
    size = f"{patch}, the patch size of '{name}' (e.g. {64 * patch})" if patch else f"the patch size of '{name}'"
    return RadioDistillError(f"student override cpe_size={cpe_size!r}: must be a multiple of {size}")


class TimmMap(nn.Module):
    """Any timm model whose ``forward_features`` is a feature map (ConvNeXt, ResNet, ...).

    The summary is the global average of the last map, shared by all teachers' summary heads.

    Args:
        name: timm model name.
        num_summary: ignored (maps have one pooled summary); kept for a uniform builder call.
        pretrained: load timm's pretrained weights (downloads; off by default).
        label: the name input errors give (a registered student built on ``name``); default ``name``.
        **kwargs: passed to ``timm.create_model``.
    """

    def __init__(self, name: str, *, num_summary: int = 0, pretrained: bool = False, label: str | None = None,
                 **kwargs):
        super().__init__()
        # what rebuilds this model in plain timm (the timm and Hugging Face exports)
        self.timm_name, self.timm_kwargs = name, dict(num_classes=0, global_pool="", **kwargs)
        self.model = timm.create_model(name, pretrained=pretrained, **self.timm_kwargs)
        self.label = label or name
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
        self.dropped = list(unused)  # what an export rebuilding this model from timm must drop too
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
    with torch.inference_mode(False), torch.enable_grad():  # also when a caller builds the student under no_grad
        params = {n: torch.empty_like(p, device="meta").requires_grad_() for n, p in model.named_parameters()}
        buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
        x = torch.empty(2, 3, *size, device="meta")  # 2: BatchNorm refuses one value per channel in training
        out = functional_call(_ForwardFeatures(model), {f"model.{n}": t for n, t in {**params, **buffers}.items()},
                              (x,))
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


VIT_MODULES = ["vision_transformer", "vit_convstem"]  # timm's module names of the models TimmViT wraps


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
    is_vit = is_model_in_modules(split_model_name_tag(name)[0], VIT_MODULES)
    return make_student(TimmViT if is_vit else TimmMap, teachers, name=name, **overrides)
