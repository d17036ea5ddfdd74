"""Calibration: statistics of a teacher's outputs on a spread sample of the dataset, the transforms
of the calibrated codecs (`codecs.py`), and the fidelity budget that picks a codec per target.

The budget picks the smallest encoding (bytes per token) whose mean token cosine to the raw output,
measured on held-back calibration samples the statistics were not fit on, meets it. Pooling is the
user's choice and stays: a pooled target is measured back at the teacher's grid.

Letters: N samples, T tokens, C channels, k stored channels, h, w grid.
"""

from dataclasses import dataclass

import torch

from ..store import codecs

ROTATION_SEED = 0  # of the random rotation used where C is not a power of two (no Hadamard matrix to build)


class Moments:
    """Running count, sum and gram of tokens in float64 on `device` (the teacher's: a thousand maps of
    CLIP-H are ~1e12 multiply-adds): mean and covariance of any number of tokens."""

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> "Moments":
        """Add the tokens of (..., C) `x` (on this device)."""
        t = x.reshape(-1, x.shape[-1]).double()
        self.count += t.shape[0]
        self.sum += t.sum(0)
        self.gram += t.T @ t
        return self

    def merged(self, other: "Moments") -> "Moments":
        out = Moments(len(self.sum))
        out.count = self.count + other.count
        out.sum, out.gram = self.sum.cpu() + other.sum.cpu(), self.gram.cpu() + other.gram.cpu()
        return out

    def statistics(self) -> "Statistics":
        mean = self.sum.cpu() / max(self.count, 1)
        cov = self.gram.cpu() / max(self.count, 1) - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(((cov + cov.T) / 2).float())  # ascending; float32 is 3x faster, and
        return Statistics(mean, cov, values.flip(0).clamp_min(0).double(), vectors.flip(1).double())  # enough


@dataclass(frozen=True)
class Statistics:
    """mean (C,), cov (C, C), eigenvalues (C,) descending and their eigenvectors (C, C) as columns; float64
    (the eigendecomposition itself in float32)."""

    mean: torch.Tensor
    cov: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


def hadamard(n: int) -> torch.Tensor:
    """(n, n) normalised Sylvester Hadamard matrix (orthonormal, entries ±1/sqrt(n)); n a power of two."""
    assert n > 0 and n & (n - 1) == 0, n
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / n**0.5


def rotation(n: int) -> torch.Tensor:
    """(n, n) orthonormal matrix spreading each axis over all n: Hadamard where n is a power of two, else a
    seeded random rotation (QR of a Gaussian matrix), which spreads as evenly on average."""
    if n & (n - 1) == 0:
        return hadamard(n)
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(ROTATION_SEED)))
    return q * torch.sign(torch.diagonal(r))  # the sign fix makes q Haar-distributed


def phis(stats: Statistics) -> torch.Tensor:
    """(C, C) PHI-S transform W (RADIOv2.5): W (x - mean) = R Uᵀ (x - mean) / sqrt(alpha), alpha the mean
    eigenvalue, every channel of which has variance 1 (exactly, where R is a Hadamard matrix)."""
    alpha = max(float(stats.eigenvalues.mean()), 1e-12)
    return rotation(len(stats.mean)) @ stats.eigenvectors.T / alpha**0.5


def basis(codec: str, stats: Statistics) -> torch.Tensor | None:
    """(C, k) float32 orthonormal columns of a calibrated codec's transform, or None for fp16 and int8."""
    channels = len(stats.mean)
    _, k = codecs.parse(codec, channels)
    if k is None:
        return None
    if k == channels:  # rot-int8: the PHI-S rotation without its scale (per-token int8 scaling absorbs it)
        return (stats.eigenvectors @ rotation(channels).T).float()
    return (stats.eigenvectors[:, :k] @ hadamard(k).T).float()


def candidates(channels: int) -> list[str]:
    """Every codec for C channels, smallest bytes per token first (ties: no transform first)."""
    pca = [f"pca{2**j}-{n}" for j in range(channels.bit_length()) if 2**j < channels for n in ("int8", "fp16")]
    names = list(codecs.PLAIN) + ["rot-int8"] + pca
    return sorted(names, key=lambda c: (codecs.token_bytes(c, channels), c not in codecs.PLAIN))


def measure(codec: str, stats: Statistics, x: torch.Tensor, *, pool: int = 1) -> torch.Tensor:
    """(T,) cosines of each raw token of `x` to its stored version (pooled, encoded, decoded, unpooled).

    Args:
        x: raw outputs, (N, h, w, C) spatial maps (pooled by `pool` first) or (N, C) summaries.
    """
    b = basis(codec, stats)
    transform = None if b is None else (stats.mean.float().to(x.device), b.to(x.device))
    stored = codecs.pool(x, pool) if x.dim() == 4 else x
    back = codecs.decode(*codecs.encode(stored, codec, transform), transform)
    back = codecs.unpool(back, tuple(x.shape[1:3])) if x.dim() == 4 else back
    return codecs.token_cosine(x, back)


@dataclass(frozen=True)
class Choice:
    """The codec a budget picked, its held-back mean and min cosine, and every codec tried."""

    codec: str
    cos_mean: float
    cos_min: float
    met: bool
    tried: list[dict]


def choose(stats: Statistics, held: torch.Tensor, budget: float, *, pool: int = 1) -> Choice:
    """The smallest codec whose mean cosine on the held-back outputs meets `budget` (the most faithful
    one, `met` False, when none does: pooling alone may cost more than the budget allows).

    Args:
        stats: fit on calibration samples other than `held`.
        held: held-back raw outputs, (N, h, w, C) or (N, C).
    """
    tried = []
    for codec in candidates(held.shape[-1]):
        cos = measure(codec, stats, held, pool=pool)
        tried.append({"codec": codec, "bytes": codecs.token_bytes(codec, held.shape[-1]),
                      "cos_mean": float(cos.mean()), "cos_min": float(cos.min())})
        if tried[-1]["cos_mean"] >= budget:
            return Choice(codec, tried[-1]["cos_mean"], tried[-1]["cos_min"], True, tried)
    best = max(tried, key=lambda t: t["cos_mean"])
    return Choice(best["codec"], best["cos_mean"], best["cos_min"], False, tried)
