"""The toy teachers' image towers: the real families' ViTs with a convolutional stem.

A ViT's linear patch embedding learns the generated world's shapes far too slowly from scratch
(BENCHMARKS §18: near chance after 1,500 steps, where a small CNN reaches 0.98). `layers.ConvStem`
in place of that one linear map makes the same ViT learn them in minutes. Everything after the patch
embedding is the family's own: timm's DINOv2 ViT (registers, layer scale), a timm ViT as
open_clip's image tower (as open_clip's SigLIP configs use), segment_anything's image encoder.

Importing this module registers the timm models `vit_toy_reg4_dinov2` and `vit_toy_clip`, so
`timm.create_model` and open_clip configs find them by name.
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ...layers import ConvStem, convstem_vit

default_cfgs = generate_default_cfgs({  # read by timm's `register_model`, by this name
    "vit_toy_reg4_dinov2.untrained": {"input_size": (3, 64, 64), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                                      "num_classes": 0},
    "vit_toy_clip.untrained": {"input_size": (3, 64, 64), "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
                               "num_classes": 0},
})


@register_model
def vit_toy_reg4_dinov2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DINOv2's ViT (4 registers, layer scale, CLS without position embedding) at 64 px, patch 8, depth 4,
    width 64, with a conv stem."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2, init_values=1e-5, reg_tokens=4,
                no_embed_class=True)
    return convstem_vit("vit_toy_reg4_dinov2", pretrained, args, kwargs)


@register_model
def vit_toy_clip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A CLIP image tower: a pre-norm ViT at 64 px, patch 8, depth 3, width 64, CLS pooled, with a conv stem."""
    args = dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=2, pre_norm=True, global_pool="token")
    return convstem_vit("vit_toy_clip", pretrained, args, kwargs)


def replace_sam_stem(sam) -> None:
    """Give a segment_anything `Sam`'s image encoder a `ConvStem` in place of its linear patch embedding."""
    proj = sam.image_encoder.patch_embed.proj
    sam.image_encoder.patch_embed.proj = ConvStem(proj.in_channels, proj.out_channels, proj.kernel_size[0])

