"""The losses against their formulas written out by hand in numpy (AM-RADIO; PHI-S with an explicit
Hadamard rotation of the eigenbasis of the teacher's covariance)."""

import numpy as np
import pytest
import torch

from radio_distill.errors import TrainingError
from radio_distill.train.losses import (LossConfig, amradio_spatial_loss, check_teacher_weights, phis_scale,
                                        phis_spatial_loss, summary_loss)

rng = np.random.default_rng(0)


def cos(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def smooth_l1(d):  # beta 1: quadratic inside |d| < 1, linear outside
    return np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5)


def test_summary_loss_is_one_minus_cosine():
    pred, target = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    assert summary_loss(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(np.mean(1 - cos(pred, target)))
    assert summary_loss(torch.tensor(pred), torch.tensor(3 * pred)).item() == pytest.approx(0, abs=1e-6)
    assert summary_loss(torch.tensor(pred), torch.tensor(-pred)).item() == pytest.approx(2)


def test_amradio_spatial_loss_is_cosine_and_smooth_l1():
    pred, target = rng.normal(size=(2, 6, 8)), 2 * rng.normal(size=(2, 6, 8))  # differences on both sides of 1
    d = pred - target
    assert (np.abs(d) < 1).any() and (np.abs(d) > 1).any()
    expected = 0.9 * np.mean(1 - cos(pred, target)) + 0.1 * np.mean(smooth_l1(d))
    assert amradio_spatial_loss(torch.tensor(pred), torch.tensor(target)).item() == pytest.approx(expected, rel=1e-6)


def hadamard(n: int) -> np.ndarray:
    """Sylvester's construction, normalised: H Hᵀ = I."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def test_phis_loss_is_mse_after_the_explicit_phis_transform():
    C = 8
    mix = rng.normal(size=(C, C)) * np.linspace(0.1, 10, C)  # anisotropic, one channel 100x another
    feats = rng.normal(size=(4000, C)) @ mix.T + rng.normal(size=C)  # the teacher's features
    mean, cov = feats.mean(0), np.cov(feats, rowvar=False)
    eigval, U = np.linalg.eigh(cov)
    H = hadamard(C)
    alpha = np.sqrt(eigval.mean())

    def phis(x):  # x -> H Uᵀ (x - mean) / alpha
        return (x - mean) @ U @ H.T / alpha

    standard = phis(feats)
    assert np.allclose(np.var(standard, axis=0, ddof=1), 1.0)  # PHI-S: every channel ends with variance 1

    target = feats[:60].reshape(2, 30, C)
    pred = target + rng.normal(size=target.shape)
    expected = np.mean((phis(pred) - phis(target)) ** 2)
    assert phis_scale(cov) == pytest.approx(alpha ** 2)
    got = phis_spatial_loss(torch.tensor(pred), torch.tensor(target), phis_scale(cov)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_phis_scale_is_the_mean_eigenvalue_down_to_a_floor_that_only_guards_zero():
    """A teacher of small activations (variance well below 1) keeps its own scale; only a dead one
    (zero covariance) is floored, at 1e-12, so its loss is finite."""
    assert phis_scale(np.diag([0.01, 0.03])) == pytest.approx(0.02, rel=1e-12)
    assert phis_scale(np.array([[2e-6, 1.0], [1.0, 4e-6]])) == pytest.approx(3e-6, rel=1e-12)  # off-diagonals: no part
    assert phis_scale(np.zeros((3, 3))) == 1e-12


def test_teacher_weights_must_name_the_stores_teachers_and_leave_one_to_train():
    teachers = ["clip", "dinov2", "sam"]
    check_teacher_weights(LossConfig(teacher_weights={"clip": 0.0, "sam": 0.0}), teachers)  # dinov2 keeps 1.0
    with pytest.raises(TrainingError, match=r"^--teacher-weight gives every teacher of the store \(clip, dinov2, sam\) "
                                            "weight 0: nothing would be trained$"):
        check_teacher_weights(LossConfig(teacher_weights={"clip": 0.0, "dinov2": 0.0, "sam": 0.0}), teachers)
    with pytest.raises(TrainingError, match=r"loss weights for unknown teachers \['dino'\]"):
        check_teacher_weights(LossConfig(teacher_weights={"dino": 0.5}), teachers)
