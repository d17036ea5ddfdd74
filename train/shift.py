"""`--denoise shift`: the student's map of view a is compared with the teacher's map of another view b of the
same image, resampled through the two stored boxes, over their overlap only. A pattern fixed to the teacher's
grid then lands on other student positions at every pair of boxes and averages out, while what the image
holds at a place lands on the same one.

Letters: B batch, h, w the teacher's grid, T = h * w tokens, C channels. Boxes (x0, y0, x1, y1) in source pixels.
"""

import torch
import torch.nn.functional as F


def token_centres(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4) boxes -> (B, h, w, 2) the (x, y) source-pixel centres of the grid's tokens over each box."""
    h, w = grid
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) / h  # (h,) in (0, 1)
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) / w
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # (B,) each
    x = x0[:, None, None] + xs[None, None, :] * (x1 - x0)[:, None, None]  # (B, 1, w)
    y = y0[:, None, None] + ys[None, :, None] * (y1 - y0)[:, None, None]  # (B, h, 1)
    return torch.stack(torch.broadcast_tensors(x, y), dim=-1)


def resample(values: torch.Tensor, source: torch.Tensor, dest: torch.Tensor,
             grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The map `values` (B, h', w', C) of the views in boxes `source` (B, 4), read (bilinear, token values at
    token centres) at the centres of the `grid` tokens over boxes `dest` (B, 4).

    Returns:
        (B, h, w, C) the values there, and (B, h, w) bool: the centre lies in the source box (outside it
        the value is the border's, and means nothing)."""
    x0, y0, x1, y1 = source.float().unbind(-1)
    centres = token_centres(dest, grid)  # (B, h, w, 2)
    origin, size = torch.stack([x0, y0], -1)[:, None, None], torch.stack([x1 - x0, y1 - y0], -1)[:, None, None]
    at = 2 * (centres - origin) / size - 1  # grid_sample's coordinates: -1 and 1 are the source box's edges
    out = F.grid_sample(values.float().permute(0, 3, 1, 2), at, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (B, C, h, w)
    return out.permute(0, 2, 3, 1), (at.abs() <= 1).all(-1)


def shift_targets(same: torch.Tensor, other: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spatial target and token weights of `--denoise shift` for the student's view a.

    Args:
        same: (B, h, w, C) the teacher's map of view a.
        other: (B, h, w, C) its map of view b (another view of the same image).
        boxes: (B, 2, 4) the boxes of a and b.

    Returns:
        (B, h, w, C) b's map over a's grid, and (B, h, w) weights: 1 / (tokens in the overlap) on the tokens of a
        whose centre lies in b, 0 elsewhere, so each image weighs the same whatever its overlap. An image whose
        boxes do not overlap at any token keeps a's own map, every token weighted 1 / T (the same-view loss)."""
    grid = tuple(same.shape[1:3])
    moved, inside = resample(other, boxes[:, 1], boxes[:, 0], grid)
    count = inside.flatten(1).sum(1)  # (B,)
    none = count == 0
    target = torch.where(none[:, None, None, None], same.float(), moved)
    inside = inside | none[:, None, None]
    weight = inside.float() / inside.flatten(1).sum(1).float()[:, None, None]
    return target, weight
