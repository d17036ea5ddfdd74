"""Features whose structure is known, for the codec tests (tests/cache/test_calibrate.py) and bench/storage.py.

(a) `outliers`: C Gaussian channels around a fixed mean; in half the tokens one of 4 fixed channels is 10x or 100x.
(b) `low_rank`: `rank` components on a fixed subspace hold 99.5 % of the energy, isotropic noise the rest.
Letters: T tokens, C channels.
"""

import math

import torch

KNOWN_C, OUTLIER_CHANNELS = 1024, (3, 100, 517, 900)


def outliers(tokens: int, factor: float, seed: int) -> torch.Tensor:
    """(T, C): N(0, 1) channels around a fixed mean; in half the tokens one of OUTLIER_CHANNELS is `factor`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, KNOWN_C, generator=g) + 0.5 * torch.randn(KNOWN_C, generator=torch.Generator().manual_seed(99))
    rows = torch.nonzero(torch.rand(tokens, generator=g) < 0.5).squeeze(1)
    x[rows, torch.tensor(OUTLIER_CHANNELS)[torch.randint(0, 4, (len(rows),), generator=g)]] = factor
    return x


def low_rank(tokens: int, seed: int, rank: int = 64, energy: float = 0.995) -> torch.Tensor:
    """(T, C): `rank` unit-variance components on a fixed subspace, plus isotropic noise holding 1 - energy."""
    g = torch.Generator().manual_seed(seed)
    subspace, _ = torch.linalg.qr(torch.randn(KNOWN_C, rank, generator=torch.Generator().manual_seed(99)))
    noise = math.sqrt(rank * (1 - energy) / energy / KNOWN_C)
    return torch.randn(tokens, rank, generator=g) @ subspace.T + noise * torch.randn(tokens, KNOWN_C, generator=g)
