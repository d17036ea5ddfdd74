"""Distillation losses, chosen by `LossConfig.kind`.

- `amradio`: summary 1 - cos; spatial 0.9 (1 - cos) + 0.1 SmoothL1 per token (AM-RADIO).
- `phis`: summary 1 - cos; spatial MSE after PHI-S standardisation (RADIOv2.5): targets and
  predictions are centred, rotated into the PCA basis, spread evenly over channels by a Hadamard
  rotation and scaled to unit variance, using the statistics the build stored. Every channel then
  weighs the same, whatever the teacher's activation scale.

Letters: B batch, T tokens, C channels.
"""

import math
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


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D) -> mean 1 - cos."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def amradio_spatial_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T, C) -> 0.9 (1 - cos) + 0.1 SmoothL1, averaged over tokens."""
    pred, target = pred.float(), target.float()
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    return 0.9 * cos + 0.1 * F.smooth_l1_loss(pred, target)


def hadamard(n: int) -> np.ndarray:
    """A normalised Hadamard matrix of order n (Sylvester x Paley), or TrainingError if none is known.

    Orders 2^k * (q + 1), q a prime = 3 mod 4, cover the common widths (384, 768, 1024, 1280, 1536).
    """
    for q in [0] + [p for p in range(3, n, 4) if all(p % d for d in range(2, int(p ** 0.5) + 1))]:
        m = q + 1 if q else 1
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            h = _paley(q) if q else np.ones((1, 1))
            while h.shape[0] < n:
                h = np.block([[h, h], [h, -h]])
            return h / math.sqrt(n)
    raise TrainingError(f"PHI-S needs a Hadamard matrix of order {n} and none is known; use --loss amradio")


def _paley(q: int) -> np.ndarray:
    """Paley construction I: Hadamard matrix of order q + 1 for a prime q = 3 mod 4."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
    jac = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)])
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return s + np.eye(q + 1)


class PhiS(torch.nn.Module):
    """x -> (x - mean) @ phi.T with phi = H Uᵀ / sqrt(mean eigenvalue): isotropic, unit variance."""

    def __init__(self, mean: np.ndarray, cov: np.ndarray):
        super().__init__()
        eigval, eigvec = np.linalg.eigh(cov)
        eigval = np.clip(eigval, 0, None)
        phi = hadamard(len(mean)) @ eigvec.T / math.sqrt(max(eigval.mean(), 1e-12))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("phi", torch.as_tensor(phi, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.phi.T


def phis_spatial_loss(pred: torch.Tensor, target: torch.Tensor, phis: PhiS) -> torch.Tensor:
    """(B, T, C), (B, T, C) -> MSE of PHI-S standardised tokens."""
    return F.mse_loss(phis(pred), phis(target))
