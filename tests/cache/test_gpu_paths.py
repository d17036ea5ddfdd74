"""The build's GPU code paths, run on the CPU: bf16 autocast (the precision the teachers run in on a GPU), and
which GPU an actor takes (Ray's placement with fake GPUs: `tests/test_fake_gpus.py`)."""

from pathlib import Path

import pytest
import torch
import zarr

from radio_distill.cache.build import build_cache
from radio_distill.cache.worker import gpu_index
from radio_distill.ops import AUTOCAST_ENV
from radio_distill.store import codecs
from radio_distill.store import layout as L

# bf16 keeps 8 bits of mantissa (rounding 2^-9 ~ 0.2% a value); through the tiny teachers' blocks and the int8
# codec the stored targets were within 1% of the fp32 build's (measured: token cos mean >= 0.99995, min >= 0.99986,
# relative error (L2 of the difference / L2 of fp32) 0.07% (dinov2 summary) to 1.02% (sam spatial)): bounds at 2-10x that
BF16_COS_MEAN, BF16_COS_MIN, BF16_REL = 0.9995, 0.999, 0.02


def decoded(store: Path, name: str, target: str) -> torch.Tensor | None:
    """(N, V, ..., C) float32 targets of a teacher as stored, decoded (int8 x scale, or fp16)."""
    root = zarr.open_group(store, mode="r")
    if L.target_array(name, target) not in root:
        return None
    values = torch.from_numpy(root[L.target_array(name, target)][...])
    scale = root[L.scale_array(name, target)][...] if L.scale_array(name, target) in root else None
    return codecs.decode(values, None if scale is None else torch.from_numpy(scale))


def test_the_build_under_bf16_autocast_on_the_cpu_stores_targets_within_bf16_of_fp32(small_store, small_config, tmp_path,
                                                                                   monkeypatch):
    """RADIO_DISTILL_AUTOCAST=bf16 runs the teachers as on a GPU (bf16 autocast + inference_mode), on the
    CPU; the store's targets are those of the fp32 build within bf16's rounding. Where Ray has GPUs (a device
    check) both builds run on them, the reference with RADIO_DISTILL_AUTOCAST=fp32."""
    import ray

    reference = small_store  # built by CPU actors in fp32
    if ray.cluster_resources().get("GPU"):
        monkeypatch.setenv(AUTOCAST_ENV, "fp32")
        reference = tmp_path / "fp32.zarr"
        assert build_cache(small_config(reference, workers=1), progress=False)["complete"]
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")  # the driver hands it to its Ray actors
    out = tmp_path / "bf16.zarr"
    report = build_cache(small_config(out, workers=1), progress=False)  # one actor: a new runtime env is a new process
    assert report["complete"] and report["ok"] == 8, report
    assert [p["autocast"] for p in report["workers"]] == ["bfloat16"] * len(report["workers"])
    assert {p["device"] for p in report["workers"]} == ({"cuda:0"} if ray.cluster_resources().get("GPU") else {"cpu"})
    for name in ("clip", "dinov2", "sam"):
        for target in L.TARGETS:
            ref, got = decoded(reference, name, target), decoded(out, name, target)
            if ref is None:
                assert got is None and (name, target) == ("sam", "summary")
                continue
            cos = codecs.token_cosine(ref, got)
            rel = float((got - ref).norm() / ref.norm())
            assert cos.mean() >= BF16_COS_MEAN and cos.min() >= BF16_COS_MIN, (name, target, cos.mean(), cos.min())
            assert 0 < rel <= BF16_REL, (name, target, rel)  # > 0: bf16 did run


def test_autocast_setting_is_checked_and_defaults_to_bf16_on_cuda_only(monkeypatch):
    from radio_distill.errors import RadioDistillError
    from radio_distill.ops import autocast, autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    assert (autocast_dtype(cpu), autocast_dtype(cuda)) == (None, torch.bfloat16)
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    assert (autocast_dtype(cpu), autocast_dtype("cuda:1")) == (torch.bfloat16, torch.bfloat16)
    with autocast(cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setenv(AUTOCAST_ENV, "fp32")
    assert (autocast_dtype(cpu), autocast_dtype(cuda)) == (None, None)
    monkeypatch.setenv(AUTOCAST_ENV, "fp16")
    with pytest.raises(RadioDistillError, match="RADIO_DISTILL_AUTOCAST='fp16': choose from auto, bf16, fp32"):
        autocast_dtype(cpu)


def test_an_actor_uses_the_gpu_ray_gave_it():
    assert gpu_index(["3"], "3") == 0  # Ray's CUDA_VISIBLE_DEVICES: its one GPU is cuda:0
    assert gpu_index([1], "0,1") == 1  # a GPU list shared by several actors
    assert gpu_index(["5"], None) == 5  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: every GPU visible
    assert gpu_index([], None) == 0
