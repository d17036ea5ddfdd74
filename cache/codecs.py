"""Target codecs: how teacher outputs become bytes, and back.

`fp16` stores half floats (then zstd, lossless). `int8` stores per-token absmax-scaled int8 plus
one fp16 scale per token (2x smaller, cos ~0.9999). Spatial maps may also be average-pooled by an
integer factor before encoding (4x smaller at factor 2). Quantisation is ours, into plain int8 and
fp16 arrays, so any Zarr v3 reader can open the store.

Letters: B batch, h, w grid, C channels; `...` any leading dims.
"""

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
MIN_SCALE = 2.0**-24  # the smallest positive fp16: a smaller floor rounds to 0 and zero tokens give 0/0 = NaN


def pool(spatial: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, h/f, w/f, C) by average pooling."""
    if factor == 1:
        return spatial
    x = F.avg_pool2d(spatial.permute(0, 3, 1, 2), factor)
    return x.permute(0, 2, 3, 1)


def encode(x: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., C) float -> (values (..., C), scale (...) or None)."""
    if codec == "fp16":
        return x.to(torch.float16), None
    if codec == "int8":
        scale = (x.abs().amax(dim=-1) / INT8_MAX).clamp_min(MIN_SCALE).to(torch.float16)
        q = torch.round(x / scale.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
        return q.to(torch.int8), scale
    raise ValueError(f"unknown codec '{codec}'; choose from fp16, int8")


def decode(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `encode`, in float32 on the tensors' device."""
    if scale is None:
        return values.float()
    return values.float() * scale.float().unsqueeze(-1)


def token_cosine(reference: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """(..., C), (..., C) -> (T,) cosine per token, T the product of the leading dims."""
    return F.cosine_similarity(reference.flatten(0, -2).float(), stored.flatten(0, -2).float(), dim=-1)


def unpool(spatial: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h', w', C) -> (B, h, w, C) bilinear, to compare a pooled map with the original grid."""
    if tuple(spatial.shape[1:3]) == tuple(size):
        return spatial
    x = F.interpolate(spatial.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)
