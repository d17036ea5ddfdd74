"""Calibration and the fidelity budget on features of known structure (the answers are computed here).

(a) outliers: C = 1024 Gaussian channels; in half the tokens one of 4 fixed channels reaches 10x or
    100x the typical magnitude. Per-token absmax int8 spends its range on that channel.
(b) low rank: C = 1024, 99.5 % of the energy in 64 components plus isotropic noise; the 64-component
    projection has cos ~ sqrt(0.995) = 0.9975 to the original.

Letters: T tokens, C channels.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from radio_distill.store import codecs
from radio_distill.cache import calibrate

# the same generators bench/storage.py reports on
_spec = importlib.util.spec_from_file_location("known_features", Path(__file__).parents[2] / "bench" / "known_features.py")
known = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(known)
C, outliers, low_rank = known.KNOWN_C, known.outliers, known.low_rank


def fit(x: torch.Tensor) -> calibrate.Statistics:
    return calibrate.Moments(x.shape[-1]).add(x).statistics()


def test_moments_give_mean_and_covariance():
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 3
    a = calibrate.Moments(6).add(x[:200])
    stats = a.merged(calibrate.Moments(6).add(x[200:])).statistics()
    assert torch.allclose(stats.mean, x.mean(0)) and torch.allclose(stats.cov, torch.cov(x.T, correction=0))
    assert torch.all(stats.eigenvalues[:-1] >= stats.eigenvalues[1:])  # descending
    u = stats.eigenvectors
    assert torch.allclose(u @ torch.diag(stats.eigenvalues) @ u.T, stats.cov, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [8, 12])
def test_phis_gives_every_channel_the_same_unit_variance(n):
    """PHI-S with a Hadamard matrix (n = 8) makes the covariance diagonal exactly 1; with the random
    rotation (n = 12) it is orthonormal and the total variance is still n."""
    x = torch.randn(4000, n, dtype=torch.float64) * torch.logspace(0, 2, n, dtype=torch.float64)
    stats = fit(x)
    w = calibrate.phis(stats)
    cov = w @ stats.cov @ w.T
    r = calibrate.rotation(n)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.trace(cov).item() == pytest.approx(n)
    if n == 8:
        assert torch.allclose(torch.diagonal(cov), torch.ones(n, dtype=torch.float64))
        assert torch.allclose(calibrate.hadamard(4) * 2, torch.tensor(
            [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64))


def test_candidates_smallest_first():
    names = calibrate.candidates(64)
    sizes = [codecs.token_bytes(c, 64) for c in names]
    assert sizes == sorted(sizes) and names[0] == "pca1-fp16" and names[-1] == "fp16"
    assert names.index("int8") < names.index("rot-int8")  # same bytes: no transform first
    assert "pca32-int8" in names and "pca64-int8" not in names


@pytest.mark.parametrize("factor", [10, 100])
def test_rotated_int8_keeps_tokens_with_outlier_channels(factor):
    stats, held = fit(outliers(2048, factor, seed=0)), outliers(1024, factor, seed=1)
    plain, rotated = calibrate.measure("int8", stats, held), calibrate.measure("rot-int8", stats, held)
    assert rotated.mean() >= 0.9999 and rotated.min() >= 0.999
    if factor == 100:  # per-token int8: the outlier tokens lose what the rotation keeps
        assert plain.mean() < 0.999 and plain.min() < rotated.min() - 0.002
        choice = calibrate.choose(stats, held, 0.999)
        assert choice.codec == "rot-int8" and choice.met and [t["codec"] for t in choice.tried][-2:] == ["int8", "rot-int8"]
    else:
        assert plain.mean() >= 0.9998


def test_budget_picks_pca_for_a_low_rank_spectrum():
    stats, held = fit(low_rank(2048, seed=0)), low_rank(1024, seed=1)
    assert calibrate.measure("pca64-fp16", stats, held).mean() == pytest.approx(math.sqrt(0.995), abs=5e-4)
    choice = calibrate.choose(stats, held, 0.99)
    assert choice.codec == "pca64-int8" and choice.met and choice.cos_mean >= 0.99
    assert codecs.token_bytes("fp16", C) / codecs.token_bytes(choice.codec, C) >= 8
    assert all(t["cos_mean"] < 0.99 for t in choice.tried[:-1])  # every smaller one misses the budget
    assert calibrate.choose(stats, held, 0.999).codec in ("int8", "rot-int8")  # past the noise floor: all channels


def test_budget_keeps_pooling_and_falls_back_to_the_most_faithful_when_unmet():
    """A checkerboard is lost by 2x2 pooling whatever the codec: the budget cannot be met."""
    x = torch.randn(4, 8, 8, 16) + 4 * torch.tensor([1.0, -1.0]).repeat(4)[None, :, None, None].expand(4, 8, 8, 16) \
        * torch.tensor([1.0, -1.0]).repeat(4)[None, None, :, None]
    stats = fit(codecs.pool(x, 2))
    choice = calibrate.choose(stats, x, 0.99, pool=2)
    assert not choice.met and choice.cos_mean < 0.5 and len(choice.tried) == len(calibrate.candidates(16))
    assert choice.cos_mean == max(t["cos_mean"] for t in choice.tried)
    smooth = torch.randn(4, 1, 1, 16).expand(4, 8, 8, 16)  # constant maps survive pooling
    assert calibrate.choose(fit(codecs.pool(smooth, 2)), smooth, 0.99, pool=2).met
