"""ViT students with a conv stem: timm's ViT with `layers.ConvStem` in place of its linear patch
embedding (Xiao et al. 2021), everything else timm's. Registered with timm by name, so they are
ordinary timm ViT students (`--student vit_tiny_convstem_patch16_224`): summary tokens, registers,
CPE, save / load, torch.hub and the ONNX export. Not the timm and Hugging Face exports: plain timm
cannot build the stem.

From scratch, a ViT's linear patch embedding learns shapes slowly: on the toy world a ViT-tiny
student stays near 0.3 x its teachers on the shape tasks after 600 steps (BENCHMARKS §13), as the
first toy teachers did (§18).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from ..layers import convstem_vit

_CFG = {"input_size": (3, 224, 224), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": 0}
default_cfgs = generate_default_cfgs({  # read by timm's `register_model`, by this name
    "vit_tiny_convstem_patch16_224.untrained": _CFG,
    "vit_small_convstem_patch16_224.untrained": _CFG,
})


@register_model
def vit_tiny_convstem_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 (192 wide, 12 blocks, 3 heads) with a conv stem: 3x3 stride-2 convs of 24, 48, 96, 192 channels."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return convstem_vit("vit_tiny_convstem_patch16_224", pretrained, args, kwargs)


@register_model
def vit_small_convstem_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 (384 wide, 12 blocks, 6 heads) with a conv stem: 3x3 stride-2 convs of 48, 96, 192, 384 channels."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return convstem_vit("vit_small_convstem_patch16_224", pretrained, args, kwargs)
