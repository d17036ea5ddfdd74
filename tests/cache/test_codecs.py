"""Codecs: int8 per-token absmax keeps cos >= 0.999, fp16 is exact to half precision, pooling is exact,
calibrated codecs decode by one matmul with the transform they encoded with."""

import pytest
import torch

from radio_distill.store import codecs


def test_int8_per_token_absmax_round_trip():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 8, 64) * torch.rand(4, 8, 8, 1) * 10  # tokens of very different norms
    values, scale = codecs.encode(x, "int8")
    assert values.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (4, 8, 8)
    assert values.abs().amax(-1).eq(127).all()  # every token uses the full range
    back = codecs.decode(values, scale)
    assert codecs.token_cosine(x, back).min() > 0.9999
    # by value, not only direction: each channel within half a step (absmax / 127 / 2) of the original
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step * 0.5 + 1e-3 * step).all()


def test_int8_known_answer():
    values, scale = codecs.encode(torch.tensor([[254.0, -127.0, 1.0, 0.0]]), "int8")
    assert scale.tolist() == [2.0] and values.tolist() == [[127, -64, 0, 0]]  # -63.5 rounds to even
    assert codecs.decode(values, scale).tolist() == [[254.0, -128.0, 0.0, 0.0]]


def test_int8_zero_and_tiny_tokens_keep_a_valid_scale():
    """A scale floor below fp16's range rounded to 0: zero tokens became 0/0 = NaN cast to int8, tiny ones 0."""
    zeros, scale = codecs.encode(torch.zeros(2, 3), "int8")
    assert torch.equal(scale, torch.full((2,), 2.0**-24, dtype=torch.float16))  # the smallest positive fp16
    assert torch.equal(zeros, torch.zeros(2, 3, dtype=torch.int8))
    assert torch.equal(codecs.decode(zeros, scale), torch.zeros(2, 3))
    tiny = torch.tensor([[1e-6, -5e-7, 0.0]])  # absmax / 127 is below fp16's smallest positive value
    values, scale = codecs.encode(tiny, "int8")
    assert values.tolist() == [[17, -8, 0]] and scale.item() == 2.0**-24  # round(1e-6 / 2**-24) = 17
    assert codecs.token_cosine(tiny, codecs.decode(values, scale)).item() > 0.999


def test_int8_values_stay_in_range_when_the_scale_rounds_down_among_fp16_subnormals():
    """absmax / 127 = 1.4 x 2**-24 is stored as the fp16 2**-24 (subnormals are multiples of it), so
    absmax / scale = 177.8: the values are clamped to +-127, not wrapped around int8."""
    a = 1.4 * 127 * 2**-24
    values, scale = codecs.encode(torch.tensor([[a, -a, a / 2]]), "int8")
    assert scale.item() == 2.0**-24 and values.tolist() == [[127, -127, 89]]  # round(88.9) = 89


def test_fp16_is_half_precision_without_scale():
    x = torch.randn(3, 5)
    values, scale = codecs.encode(x, "fp16")
    assert scale is None and values.dtype == torch.float16
    assert torch.equal(codecs.decode(values, None), x.half().float())


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="unknown codec 'bf16' for 2 channels; choose from fp16, int8, rot-int8"):
        codecs.encode(torch.zeros(1, 2), "bf16")
    for bad in ("pca3-int8", "pca64-int8", "pca0-fp16", "pca8-bf16"):  # k not a power of two below C=64
        with pytest.raises(ValueError, match=f"unknown codec '{bad}'"):
            codecs.parse(bad, 64)


def test_codec_sizes():
    assert [codecs.parse(c, 64) for c in ("fp16", "int8", "rot-int8", "pca8-int8", "pca16-fp16")] == \
        [("fp16", None), ("int8", None), ("int8", 64), ("int8", 8), ("fp16", 16)]
    assert [codecs.token_bytes(c, 64) for c in ("fp16", "int8", "rot-int8", "pca8-int8", "pca16-fp16")] == \
        [128, 66, 66, 10, 32]
    assert codecs.stored_channels("pca8-int8", 64) == 8 and codecs.stored_channels("int8", 64) == 64
    # k = 1 = 2**0 is a power of two: the smallest calibrated codec (one principal component)
    assert codecs.parse("pca1-fp16", 64) == ("fp16", 1) and codecs.parse("pca1-int8", 2) == ("int8", 1)
    assert codecs.parse("pca2-int8", 64) == ("int8", 2) and codecs.parse("pca32-fp16", 64) == ("fp16", 32)


def test_transform_codec_encodes_coefficients_and_decodes_by_one_matmul():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(32, 8))  # (C, k) orthonormal columns
    mean = torch.randn(32)
    x = torch.randn(2, 3, 3, 8) @ basis.T + mean  # tokens inside the subspace: exact up to rounding
    values, scale = codecs.encode(x, "pca8-fp16", (mean, basis))
    assert scale is None and values.shape == (2, 3, 3, 8) and values.dtype == torch.float16
    assert torch.allclose(values.float(), (x - mean) @ basis, atol=2e-3)
    back = codecs.decode(values, None, (mean, basis))
    assert back.shape == x.shape and torch.allclose(back, x, atol=5e-3)
    values, scale = codecs.encode(x, "pca8-int8", (mean, basis))
    assert values.dtype == torch.int8 and scale.shape == (2, 3, 3)
    back = codecs.decode(values, scale, (mean, basis))
    assert codecs.token_cosine(x - mean, back - mean).min() > 0.999
    coefficient_step = ((x - mean) @ basis).abs().amax(-1, keepdim=True) / 127  # error of an orthonormal map
    assert ((back - x).norm(dim=-1, keepdim=True) <= coefficient_step * 0.5 * 8**0.5 * 1.01).all()


def test_pool_averages_and_unpool_restores_the_grid():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    pooled = codecs.pool(x, 2)
    assert pooled.shape == (2, 2, 2, 3)
    assert torch.allclose(pooled[0, 0, 0], x[0, :2, :2].reshape(-1, 3).mean(0))
    assert codecs.pool(x, 1) is x
    assert codecs.unpool(pooled, (4, 4)).shape == x.shape
    constant = torch.ones(1, 2, 2, 3)
    assert torch.allclose(codecs.unpool(constant, (4, 4)), torch.ones(1, 4, 4, 3))
    # bilinear with half-pixel centres (align_corners=False): a 2-token ramp 0, 1 widens to 0, 1/4, 3/4, 1
    ramp = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1)
    assert codecs.unpool(ramp, (1, 4)).flatten().tolist() == [0.0, 0.25, 0.75, 1.0]
