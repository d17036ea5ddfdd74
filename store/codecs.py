"""Target codecs: how teacher outputs become bytes, and back.

`fp16` stores half floats (then zstd, lossless). `int8` stores per-token absmax-scaled int8 plus
one fp16 scale per token (2x smaller, cos ~0.9999). Spatial maps may also be average-pooled by an
integer factor before encoding (4x smaller at factor 2). Quantisation is ours, into plain int8 and
fp16 arrays, so any Zarr v3 reader can open the store.

Calibrated codecs first map each token through a transform fit on calibration samples
(`calibrate.py`), y = (x - mean) @ basis with `basis` (C, k) orthonormal columns, then store y as
int8 or fp16; decoding is one matmul, x = y @ basisᵀ + mean:
- `rot-int8`: k = C, basis = the PHI-S rotation U Hᵀ (U covariance eigenvectors, H Hadamard): a
  few huge outlier channels are spread over all channels before per-token scaling.
- `pca<k>-int8`, `pca<k>-fp16`: the k leading principal components (rotated by a k x k Hadamard, so
  int8 coefficients share their range evenly); k is a power of two.

Letters: B batch, h, w grid, C channels, k stored channels; `...` any leading dims.
"""

import re

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
MIN_SCALE = 2.0**-24  # the smallest positive fp16: a smaller floor rounds to 0 and zero tokens give 0/0 = NaN
PLAIN = ("fp16", "int8")  # codecs without a transform: the defaults, and all a layout v1 store holds


def pool(spatial: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w, C) -> (B, h/f, w/f, C) by average pooling."""
    if factor == 1:
        return spatial
    x = F.avg_pool2d(spatial.permute(0, 3, 1, 2), factor)
    return x.permute(0, 2, 3, 1)


def parse(codec: str, channels: int) -> tuple[str, int | None]:
    """A codec name -> (number format 'fp16' | 'int8', stored channels k of its transform or None).

    Raises:
        ValueError: an unknown name, or k not a power of two below `channels`.
    """
    if codec in PLAIN:
        return codec, None
    if codec == "rot-int8":
        return "int8", channels
    m = re.fullmatch(r"pca(\d+)-(int8|fp16)", codec)
    k = int(m.group(1)) if m else 0
    if not m or k < 1 or k & (k - 1) or k >= channels:
        raise ValueError(f"unknown codec '{codec}' for {channels} channels; choose from fp16, int8, rot-int8, "
                         f"pca<k>-int8, pca<k>-fp16 with k a power of two below {channels}")
    return m.group(2), k


def stored_channels(codec: str, channels: int) -> int:
    """Channels per stored token: C, or k of a PCA codec."""
    return parse(codec, channels)[1] or channels


def token_bytes(codec: str, channels: int) -> int:
    """Bytes per stored token before zstd: values plus the int8 scale."""
    number, k = parse(codec, channels)
    k = k or channels
    return 2 * k if number == "fp16" else k + 2


def encode(x: torch.Tensor, codec: str,
           transform: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., C) float -> (values (..., k), scale (...) or None).

    Args:
        transform: (mean (C,), basis (C, k)) of a calibrated codec, on x's device; None for fp16, int8.
    """
    number, k = parse(codec, x.shape[-1])
    assert (k is None) == (transform is None), codec
    if transform is not None:
        mean, basis = transform
        x = (x.float() - mean) @ basis
    if number == "fp16":
        return x.to(torch.float16), None
    scale = (x.abs().amax(dim=-1) / INT8_MAX).clamp_min(MIN_SCALE).to(torch.float16)
    q = torch.round(x / scale.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def decode(values: torch.Tensor, scale: torch.Tensor | None,
           transform: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Inverse of `encode`, (..., k) -> (..., C) float32 on the tensors' device."""
    x = values.float() if scale is None else values.float() * scale.float().unsqueeze(-1)
    if transform is None:
        return x
    mean, basis = transform
    return torch.addmm(mean, x.reshape(-1, x.shape[-1]), basis.T).reshape(*x.shape[:-1], basis.shape[0])


def token_cosine(reference: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """(..., C), (..., C) -> (T,) cosine per token, T the product of the leading dims."""
    return F.cosine_similarity(reference.flatten(0, -2).float(), stored.flatten(0, -2).float(), dim=-1)


def unpool(spatial: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h', w', C) -> (B, h, w, C) bilinear, to compare a pooled map with the original grid."""
    if tuple(spatial.shape[1:3]) == tuple(size):
        return spatial
    x = F.interpolate(spatial.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)
