"""Dense probe: per-patch linear classifiers on frozen feature maps, scored by mIoU against masks.

Masks are PNG label maps in a folder mirroring the images: sample id `a/b.jpg` has mask
`<masks>/a/b.png` (a tar sample `s/000.tar/key`: `<masks>/s/000.tar/key.png`), value = class index + 1 on objects, 0 background, 255 ignored. A mask is cropped
with the view's stored box and resized with nearest resampling to each feature grid.

Letters: M images, h, w a feature grid, C channels, P = M * h * w tokens, K mask classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..store.sources import oriented_size
from .metrics import IGNORE, miou


def mask_path(masks: Path, sample_id: str) -> Path:
    """Mask file of a sample: the id's relative path under `masks`, with a .png suffix."""
    return Path(masks) / Path(sample_id).with_suffix(".png")


def mask_grid(mask: Image.Image, box, grid: tuple[int, int], *, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Crop `box` (x0, y0, x1, y1 in source-image pixels) of a label map, nearest-resized to `grid` (h, w).

    Args:
        mask: label map ('L' or 'P' mode).
        box: (4,) view box in source-image pixels.
        grid: (h, w) output size.
        image_size: (W, H) of the source image when the mask has another size (the box is rescaled).

    Returns:
        (h, w) int64 labels.
    """
    sx = sy = 1.0
    if image_size is not None and tuple(image_size) != mask.size:
        sx, sy = mask.size[0] / image_size[0], mask.size[1] / image_size[1]
    x0, y0, x1, y1 = (float(c) for c in box)
    region = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    return np.asarray(mask.resize((grid[1], grid[0]), Image.Resampling.NEAREST, box=region), dtype=np.int64)


def load_masks(masks: Path, images: list, ids, boxes, grids) -> dict[tuple[int, int], np.ndarray]:
    """(M, h, w) label grids per requested grid, for samples that all have masks.

    Args:
        masks: the mask folder.
        images: (M,) the images as `Images.read` gives them (files or bytes; for source sizes, read from headers only).
        ids: (M,) sample ids.
        boxes: (M, 4) view boxes.
        grids: the (h, w) grids wanted.
    """
    out = {tuple(g): [] for g in grids}
    for image, sample_id, box in zip(images, ids, boxes):
        size = oriented_size(image)
        with Image.open(mask_path(masks, sample_id)) as mask:
            for g in out:
                out[g].append(mask_grid(mask, box, g, image_size=size))
    return {g: np.stack(v) if v else np.zeros((0, *g), np.int64) for g, v in out.items()}


def train_linear_probe(x, y, *, num_classes: int, steps: int = 300, lr: float = 3e-2, weight_decay: float = 1e-4,
                       device: str | torch.device = "cpu", seed: int = 0) -> torch.nn.Module:
    """A per-token linear classifier (with input standardisation), trained full-batch with AdamW.

    lr 3e-2 converges in the default 300 steps: on the toy DINOv2's tokens, 1e-2 stopped at mIoU 0.653
    where 3,000 steps reach 0.682 (BENCHMARKS §18).

    Args:
        x: (P, C) token features.
        y: (P,) labels in [0, K) or IGNORE.
        num_classes: K.
        steps: full-batch optimisation steps.

    Returns:
        a module mapping (P, C) features to (P, K) logits, on `device`, in eval mode.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    norm = _Standardise(x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6))
    x = norm(x)
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
        linear.bias.zero_()
    linear = linear.to(device)
    opt = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(linear(x), y, ignore_index=IGNORE).backward()
        opt.step()
    probe = torch.nn.Sequential(norm, linear)
    return probe.eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x):
        return (x - self.mean) / self.std


def probe_miou(train_feats, train_masks, test_feats, test_masks, *, num_classes: int, steps: int = 300,
               max_tokens: int = 200_000, device: str | torch.device = "cpu", seed: int = 0) -> float:
    """Train a linear probe on one feature map set and score mIoU on another, at the features' own grid.

    Args:
        train_feats: (M, h, w, C) features; train_masks: (M, h, w) labels.
        test_feats: (M', h, w, C); test_masks: (M', h, w).
        num_classes: K (background included).
        max_tokens: training tokens kept (a seeded subset when there are more).

    Returns:
        mIoU on the test tokens.
    """
    x = np.asarray(train_feats, dtype=np.float32).reshape(-1, train_feats.shape[-1])  # (P, C)
    y = np.asarray(train_masks).reshape(-1)  # (P,)
    if len(x) > max_tokens:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_tokens, replace=False))
        x, y = x[keep], y[keep]
    probe = train_linear_probe(x, y, num_classes=num_classes, steps=steps, device=device, seed=seed)
    with torch.no_grad():
        test = torch.as_tensor(np.asarray(test_feats, dtype=np.float32).reshape(-1, test_feats.shape[-1]), device=device)
        pred = probe(test).argmax(1).cpu().numpy()
    return miou(pred, np.asarray(test_masks).reshape(-1), num_classes=num_classes)
