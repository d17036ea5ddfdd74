"""The toy teachers' image towers: the real families' ViTs with a convolutional stem.

A ViT's linear patch embedding learns the generated world's shapes far too slowly from scratch
(BENCHMARKS §18: near chance after 1,500 steps, where a small CNN reaches 0.98). A stem of strided
3x3 convolutions in place of that one linear map (Xiao et al. 2021, "Early convolutions help
transformers see better") makes the same ViT learn them in minutes. Everything after the patch
embedding is the family's own: timm's DINOv2 ViT (registers, layer scale), a timm ViT as
open_clip's image tower (as open_clip's SigLIP configs use), segment_anything's image encoder.

Importing this module registers the timm models `vit_toy_reg4_dinov2` and `vit_toy_clip`, so
`timm.create_model` and open_clip configs find them by name.
"""

from __future__ import annotations

import math

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ConvStem(nn.Module):
    """(B, 3, R, R) -> (B, D, R / patch, R / patch): log2(patch) stride-2 3x3 conv-BN-ReLU layers
    (channels doubling up to D), then a 1x1 conv to D. `patch` is a power of two."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        n = int(math.log2(patch))
        if 2 ** n != patch or n < 1:
            raise ValueError(f"a conv stem needs a power-of-two patch size, not {patch}")
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


default_cfgs = generate_default_cfgs({  # read by timm's `register_model`, by this name
    "vit_toy_reg4_dinov2.untrained": {"input_size": (3, 64, 64), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                                      "num_classes": 0},
    "vit_toy_clip.untrained": {"input_size": (3, 64, 64), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
                               "num_classes": 0},
})


def _create(variant: str, pretrained: bool, args: dict, kwargs: dict) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, embed_layer=ConvPatchEmbed, **{**args, **kwargs})


@register_model
def vit_toy_reg4_dinov2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DINOv2's ViT (4 registers, layer scale, CLS without position embedding) at 64 px, patch 8, depth 4,
    width 64, with a conv stem."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, init_values=1e-5, reg_tokens=4,
                no_embed_class=True)
    return _create("vit_toy_reg4_dinov2", pretrained, args, kwargs)


@register_model
def vit_toy_clip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A CLIP image tower: a pre-norm ViT at 64 px, patch 8, depth 3, width 64, CLS pooled, with a conv stem."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=2, pre_norm=True, global_pool="token")
    return _create("vit_toy_clip", pretrained, args, kwargs)


def replace_sam_stem(sam) -> None:
    """Give a segment_anything `Sam`'s image encoder a `ConvStem` in place of its linear patch embedding."""
    proj = sam.image_encoder.patch_embed.proj
    sam.image_encoder.patch_embed.proj = ConvStem(proj.in_channels, proj.out_channels, proj.kernel_size[0])

