"""E-RADIO: the fast hybrid CNN / windowed-attention student of AM-RADIO (arXiv 2312.06709).

Shapes: B batch, H, W input pixels, C channels, h, w a stage's map, N tokens per window,
nh heads, hd head width, D neck width.

Layout: stem (two 3x3 stride-2 Conv-BN-SiLU, to 1/4) -> stage 1 (C2f, 1/4) -> down ->
stage 2 (C2f, 1/8) -> down -> stage 3 (multi-resolution windowed attention, 1/16) -> down ->
stage 4 (windowed attention, 1/32). Downsamplers are 3x3 stride-2 Conv-BN. The hi-res neck
projects stages 2-4 to D (= the stage-4 width) with Conv-BN (3x3 stride 2 for stage 2, 1x1 for
stages 3-4, stage 4 then upsampled x2) and sums them into one (B, D, H/16, W/16) map. The
summary is that map's mean. Inputs must be divisible by 32.

Window rule (``window_size``): a side of s tokens with configured window W gets
n = ceil(s / W) windows of size ceil(s / n); the map is zero-padded to n * size and padded keys
are masked out. E.g. W=16: s=14 -> 14, s=32 -> 16, s=34 -> 12 (pad 2), s=7 -> 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from ._registry import register_student
from .model import IMAGENET_MEAN, IMAGENET_STD, Student, TeacherDims, check_input, make_student


@dataclass(frozen=True)
class ERadioCfg:
    """E-RADIO size. ``heads`` has one entry per stage; stages 1-2 (C2f) do not use theirs."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    window: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation; ``fuse`` folds the BN into the conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C,)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, bias=True).to(conv.weight)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv, self.bn = fused, nn.Identity()


class Bottleneck(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 CSP block: split, chain n bottlenecks on one half, concat every output, 1x1 mix."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.c = c // 2
        self.cv1 = ConvBN(c, 2 * self.c, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * self.c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def window_size(side: int, window: int) -> tuple[int, int]:
    """Window size and count for a map side (see the module docstring).

    Returns:
        (size, count) with size * count >= side and size * count - side < size.
    """
    n = math.ceil(side / window)
    size = math.ceil(side / n)
    assert size * (n - 1) < side, "a window would be all padding"
    return size, n


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a SwinV2 log-spaced continuous position bias.

    Works on (B, h, w, C) maps and returns (B, h, w, nh * hd) (no output projection).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, window: int, cpb_hidden: int = 256):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, head_dim, window
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        # small MLP from log-spaced relative (dy, dx) to a per-head bias; works for any window
        self.cpb = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(), nn.Linear(cpb_hidden, heads, bias=False))

    def bias(self, wh: int, ww: int, device: torch.device) -> Tensor:
        """Relative position bias (nh, N, N) for a wh x ww window."""
        ys, xs = torch.arange(wh, device=device), torch.arange(ww, device=device)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).flatten(1)  # (2, N)
        rel = (grid[:, :, None] - grid[:, None, :]).permute(1, 2, 0).float()  # (N, N, 2)
        rel = rel / torch.tensor([max(wh - 1, 1), max(ww - 1, 1)], device=device) * 8
        rel = torch.sign(rel) * torch.log2(rel.abs() + 1) / math.log2(8)
        return 16 * torch.sigmoid(self.cpb(rel)).permute(2, 0, 1)  # (nh, N, N)

    def forward(self, x: Tensor) -> Tensor:
        B, h, w, C = x.shape
        (wh, nh_), (ww, nw_) = window_size(h, self.window), window_size(w, self.window)
        ph, pw = wh * nh_ - h, ww * nw_ - w
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        x = x.view(B, nh_, wh, nw_, ww, C).transpose(2, 3).reshape(-1, wh * ww, C)  # (B*nW, N, C)
        q, k, v = self.qkv(x).view(x.shape[0], -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = self.bias(wh, ww, x.device).to(q.dtype)[None]  # (1, nh, N, N)
        if ph or pw:  # mask padded keys; the (B*nW, nh, N, N) mask exists only at odd sizes
            valid = torch.zeros(h + ph, w + pw, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.view(nh_, wh, nw_, ww).transpose(1, 2).reshape(-1, 1, 1, wh * ww)
            mask = mask.masked_fill(~valid, float("-inf")).repeat(B, 1, 1, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B*nW, nh, N, hd)
        o = o.transpose(1, 2).reshape(B, nh_, nw_, wh, ww, -1).transpose(2, 3)
        return o.reshape(B, h + ph, w + pw, -1)[:, :h, :w]


class MultiResAttention(nn.Module):
    """Half the heads attend at full resolution, half on a 2x average-pooled map (upsampled back).

    The low-resolution branch sees 4x the context per window at a quarter of the cost.
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        hd, half = dim // heads, max(heads // 2, 1)
        self.full = WindowAttention(dim, half, hd, window)
        self.low = WindowAttention(dim, max(heads - half, 1), hd, window)
        self.out_dim = (half + max(heads - half, 1)) * hd

    def forward(self, x: Tensor) -> Tensor:
        low = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # (B, h/2, w/2, C)
        low = self.low(low).permute(0, 3, 1, 2)
        low = F.interpolate(low, scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
        return torch.cat([self.full(x), low], -1)  # (B, h, w, nh * hd)


class Block(nn.Module):
    """Pre-norm transformer block on (B, h, w, C) maps with windowed (or multi-res) attention."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, drop_path: float,
                 multires: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if multires and heads > 1:
            self.attn = MultiResAttention(dim, heads, window)
            out = self.attn.out_dim
        else:
            self.attn, out = WindowAttention(dim, heads, dim // heads, window), dim // heads * heads
        self.proj = nn.Linear(out, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.proj(self.attn(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AttnStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 dpr: list[float], multires: bool):
        super().__init__()
        self.blocks = nn.Sequential(
            *(Block(dim, heads, window, mlp_ratio, dpr[i], multires) for i in range(depth)))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, h, w)
        return self.blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ERadio(nn.Module):
    """E-RADIO backbone following the student backbone contract (see ``model.py``).

    Args:
        cfg: the size.
        num_summary: ignored (one pooled summary, shared); kept for a uniform builder call.
    """

    def __init__(self, cfg: ERadioCfg, *, num_summary: int = 0):
        super().__init__()
        c1, c2, c3, c4 = cfg.widths
        n = sum(cfg.depths[2:])  # drop path rises linearly over the attention blocks
        dpr = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.stem = nn.Sequential(ConvBN(3, c1 // 2, 3, 2), ConvBN(c1 // 2, c1, 3, 2))
        self.stage1 = C2f(c1, cfg.depths[0])
        self.down1 = ConvBN(c1, c2, 3, 2, act=False)
        self.stage2 = C2f(c2, cfg.depths[1])
        self.down2 = ConvBN(c2, c3, 3, 2, act=False)
        self.stage3 = AttnStage(c3, cfg.depths[2], cfg.heads[2], cfg.window, cfg.mlp_ratio,
                                dpr[: cfg.depths[2]], multires=True)
        self.down3 = ConvBN(c3, c4, 3, 2, act=False)
        self.stage4 = AttnStage(c4, cfg.depths[3], cfg.heads[3], cfg.window, cfg.mlp_ratio,
                                dpr[cfg.depths[2]:], multires=False)
        self.neck2 = ConvBN(c2, c4, 3, 2, act=False)
        self.neck3 = ConvBN(c3, c4, 1, act=False)
        self.neck4 = ConvBN(c4, c4, 1, act=False)
        self.cfg, self.input_stride = cfg, 32
        self.feature_info = {"num_chs": c4, "reduction": 16}
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, 32, "E-RADIO")
        x2 = self.stage2(self.down1(self.stage1(self.stem(x))))  # (B, c2, H/8, W/8)
        x3 = self.stage3(self.down2(x2))  # (B, c3, H/16, W/16)
        x4 = self.stage4(self.down3(x3))  # (B, c4, H/32, W/32)
        up4 = F.interpolate(self.neck4(x4), scale_factor=2, mode="nearest")
        spatial = self.neck2(x2) + self.neck3(x3) + up4  # (B, D, H/16, W/16)
        return spatial.mean((2, 3)).unsqueeze(1), spatial  # (B, 1, D), (B, D, h, w)

    def switch_to_deploy(self) -> "ERadio":
        """Folds every BatchNorm into its convolution (exact in eval mode)."""
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.fuse()
        return self


def _eradio(cfg: ERadioCfg, teachers: dict[str, TeacherDims], **overrides) -> Student:
    backbone_keys = {"window", "mlp_ratio", "drop_path_rate"}
    cfg_kw = {k: overrides.pop(k) for k in list(overrides) if k in backbone_keys}
    cfg = ERadioCfg(**{**cfg.__dict__, **cfg_kw})
    return make_student(lambda num_summary: ERadio(cfg, num_summary=num_summary), teachers, **overrides)


@register_student
def test_eradio(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """Tiny E-RADIO for CPU tests."""
    return _eradio(ERadioCfg((16, 32, 32, 64), (1, 1, 1, 1), (1, 2, 2, 4), window=4), teachers, **overrides)


@register_student
def eradio_small(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    return _eradio(ERadioCfg((64, 128, 256, 512), (1, 2, 3, 2), (2, 4, 8, 16)), teachers, **overrides)


@register_student
def eradio_base(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    return _eradio(ERadioCfg((96, 192, 384, 768), (2, 3, 4, 3), (3, 6, 12, 24)), teachers, **overrides)


@register_student
def eradio_large(*, teachers: dict[str, TeacherDims], **overrides) -> Student:
    """The published E-RADIO size."""
    return _eradio(ERadioCfg((192, 384, 768, 1536), (3, 3, 5, 5), (2, 4, 8, 16)), teachers, **overrides)
