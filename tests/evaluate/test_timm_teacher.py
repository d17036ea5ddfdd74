"""Any timm image model as a teacher: toy SigLIP and DINOv3 architectures (random init) are cached,
trained from and evaluated like the built-in families."""

import zarr

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import TeacherSpec
from radio_distill.evaluate import EvalConfig, evaluate
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

from .conftest import FAST

TOY = (("depth", 2), ("embed_dim", 48), ("num_heads", 2))
TEACHERS = (TeacherSpec("siglip", "timm", "vit_base_patch16_siglip_224", resolution=64, random_init=True,
                        model_kwargs=(*TOY, ("patch_size", 8))),
            TeacherSpec("dinov3", "timm", "vit_small_patch16_dinov3", resolution=64, random_init=True, model_kwargs=TOY))


def test_timm_teachers_build_train_and_evaluate(tmp_path):
    images = make_sample_dataset(tmp_path / "data", images=16, size=64)
    store = tmp_path / "cache.zarr"
    build_cache(CacheConfig(data=images, out=store, teachers=TEACHERS, shard_size=8, workers=1), progress=False)
    root = zarr.open_group(store, mode="r")
    for name, grid in (("siglip", [8, 8]), ("dinov3", [4, 4])):
        attrs = root[f"teachers/{name}"].attrs
        assert attrs["identity"]["family"] == "timm" and list(attrs["grid"]) == grid and attrs["summary_dim"] == 48
    assert list(root["teachers/siglip"].attrs["mean"]) == [0.5, 0.5, 0.5]  # SigLIP's own preprocessing
    train(TrainConfig(store=store, out=tmp_path / "run", student="test_vit", steps=3, batch_size=4, resolution=32,
                      workers=0, device="cpu", holdout=0.3, log_every=1), progress=False)
    r = evaluate(EvalConfig(store=store, run=tmp_path / "run", out=tmp_path / "eval", pictures=1, probe_images=4,
                            **{**FAST, "probe_steps": 5}), progress=False)
    for name in ("siglip", "dinov3"):
        fid = r["fidelity"]["teachers"][name]
        assert -1 <= fid["summary"] <= 1 and -1 <= fid["spatial"] <= 1
        assert r["throughput"]["teachers"][name]["images_per_s"] > 0
    assert r["throughput"]["teachers"]["siglip"]["architecture"] == "vit_base_patch16_siglip_224"
    assert r["sam"] == {"skipped": "the store has no SAM teacher"}
