"""Distillation losses, chosen by `LossConfig.kind`.

- `amradio`: summary 1 - cos; spatial 0.9 (1 - cos) + 0.1 SmoothL1 per token (AM-RADIO).
- `phis`: summary 1 - cos; spatial MSE after PHI-S standardisation (RADIOv2.5), using the
  covariance the build stored: every teacher's loss is on the same scale, whatever its
  activation magnitude.

Letters: B batch, T tokens, C channels.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainingError


KINDS = ("amradio", "phis")


@dataclass(frozen=True)
class LossConfig:
    kind: str = "amradio"
    summary_weight: float = 1.0
    spatial_weight: float = 1.0
    teacher_weights: dict[str, float] = field(default_factory=dict)  # default 1.0 each


def check_teacher_weights(loss: LossConfig, teachers: list[str]) -> None:
    """One line unless every weighted teacher is one of the store's `teachers` and one of them weighs more than 0."""
    unknown = set(loss.teacher_weights) - set(teachers)
    if unknown:
        raise TrainingError(f"loss weights for unknown teachers {sorted(unknown)}; the store has {sorted(teachers)}")
    if not any(loss.teacher_weights.get(name, 1.0) for name in teachers):  # every step would change nothing
        raise TrainingError(f"--teacher-weight gives every teacher of the store ({', '.join(teachers)}) weight 0: "
                            "nothing would be trained")


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> mean 1 - cos."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def spatial_mean(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, T) per-token losses -> their mean; with (B, T) `weight` (each row summing to 1, `shift.shift_targets`),
    the mean over the batch of each sample's weighted sum."""
    return per_token.mean() if weight is None else (per_token * weight).sum() / len(per_token)


def amradio_spatial_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C), (B, T, C), optional (B, T) token weights -> 0.9 (1 - cos) + 0.1 SmoothL1, averaged over tokens."""
    pred, target = pred.float(), target.float()
    cos = 1 - F.cosine_similarity(pred, target, dim=-1)  # (B, T)
    l1 = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    return 0.9 * spatial_mean(cos, weight) + 0.1 * spatial_mean(l1, weight)


def phis_scale(cov: np.ndarray) -> float:
    """The PHI-S variance of a teacher: the mean eigenvalue of its (C, C) feature covariance."""
    return max(float(np.trace(cov)) / len(cov), 1e-12)


def phis_spatial_loss(pred: torch.Tensor, target: torch.Tensor, scale: float,
                      weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, C), (B, T, C), optional (B, T) token weights -> MSE of PHI-S standardised tokens.

    PHI-S maps x -> H Uᵀ (x - mean) / sqrt(scale) (U the covariance eigenvectors, H a normalised
    Hadamard matrix): an isometry up to 1 / sqrt(scale), so the MSE after it is exactly
    MSE(pred, target) / scale, computed here without the (C, C) products.
    """
    return spatial_mean((pred.float() - target.float()).square().mean(-1), weight) / scale
