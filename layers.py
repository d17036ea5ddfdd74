"""Network layers shared by teachers and students.

`ConvStem` is the "early convolutions" patch embedding (Xiao et al. 2021, "Early convolutions help
transformers see better"): strided 3x3 convolutions in place of a ViT's one linear map per patch. A
ViT with it learns shapes from scratch far faster (BENCHMARKS §18); the rest of the ViT is unchanged.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import RadioDistillError


class ConvStem(nn.Module):
    """(B, 3, R, R) -> (B, D, R / patch, R / patch): log2(patch) stride-2 3x3 conv-BN-ReLU layers
    (channels doubling up to D), then a 1x1 conv to D. `patch` is a power of two."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        n = int(math.log2(patch))
        if 2 ** n != patch or n < 1:
            raise RadioDistillError(f"patch_size={patch!r}: a conv stem needs a power-of-two patch size (8, 16, ...)")
        chans = [in_chans] + [max(16, dim >> (n - 1 - k)) for k in range(n)]
        layers = []
        for a, b in zip(chans, chans[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        self.layers = nn.Sequential(*layers, nn.Conv2d(chans[-1], dim, 1))

    def forward(self, x):
        return self.layers(x)


class ConvPatchEmbed(PatchEmbed):
    """timm's `PatchEmbed` with a `ConvStem` as its projection (same grid, same output)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.proj = ConvStem(self.proj.in_channels, self.proj.out_channels, self.patch_size[0])


def convstem_vit(variant: str, pretrained: bool, args: dict, kwargs: dict) -> VisionTransformer:
    """timm's `VisionTransformer` named `variant` (its default cfg registered by the caller) with a
    `ConvPatchEmbed`; `kwargs` override the size `args`."""
    return build_model_with_cfg(VisionTransformer, variant, pretrained, embed_layer=ConvPatchEmbed, **{**args, **kwargs})
