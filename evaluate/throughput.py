"""Forward throughput (images/s) of the student and of every teacher's architecture on this device.

Evaluation never imports open_clip or segment_anything: each teacher architecture is rebuilt as
its timm equivalent with random weights (speed does not depend on the weights), at the teacher's
stored resolution. bf16 autocast on CUDA, fp32 on CPU, a few warm-up iterations first.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from ..errors import EvaluationError
from ..ops import autocast
from ..progress import Progress

# open_clip model name -> timm architecture of the same image tower (pre-norm ViT, class token pooling, proj)
CLIP_TIMM = {
    "ViT-B-32": "vit_base_patch32_clip_224", "ViT-B-16": "vit_base_patch16_clip_224",
    "ViT-L-14": "vit_large_patch14_clip_224", "ViT-H-14": "vit_huge_patch14_clip_224",
    "ViT-g-14": "vit_giant_patch14_clip_224", "ViT-bigG-14": "vit_gigantic_patch14_clip_224",
}
# segment_anything registry name -> timm image encoder of the same size
SAM_TIMM = {"vit_b": "samvit_base_patch16", "vit_l": "samvit_large_patch16", "vit_h": "samvit_huge_patch16",
            "default": "samvit_huge_patch16"}
# the tiny preset's SAM image encoder (cache/teachers.py::build_tiny_sam), in timm's terms
TINY_SAM = ("samvit_base_patch16", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                                        global_attn_indexes=(1,), neck_chans=32, use_rel_pos=True))
MODEL_CONFIGS = Path(__file__).resolve().parent.parent / "cache" / "model_configs"  # our own open_clip configs


def timm_equivalent(ident: dict, resolution: int) -> tuple[str, dict]:
    """The timm architecture (name, create_model kwargs) of a stored teacher identity.

    Raises:
        LookupError: with the reason, for architectures without a known timm equivalent.
    """
    family, model = ident["family"], ident["model"]
    kwargs = {"img_size": resolution, "num_classes": 0}
    if family == "clip":
        config = MODEL_CONFIGS / f"{model}.json"
        if not config.is_file():  # open_clip's own configs, found without importing open_clip
            config = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs" / config.name
        raw = json.loads(config.read_text()) if config.is_file() else {"vision_cfg": {}}
        if "timm_model_name" in raw["vision_cfg"]:  # a timm image tower (SigLIP...): that very architecture
            return raw["vision_cfg"]["timm_model_name"], kwargs
        if config.parent == MODEL_CONFIGS:  # our own configs (the tiny preset): a timm CLIP ViT of the same dims
            v = raw["vision_cfg"]
            return "vit_base_patch16_clip_224", {**kwargs, "patch_size": v["patch_size"], "embed_dim": v["width"],
                                                 "depth": v["layers"], "num_heads": v["width"] // v.get("head_width", 64),
                                                 "mlp_ratio": v.get("mlp_ratio", 4.0), "num_classes": raw["embed_dim"]}
        base = model.removesuffix("-quickgelu").removesuffix("-336").removesuffix("-378")
        if base not in CLIP_TIMM:
            raise LookupError(f"no timm equivalent known for open_clip model '{model}' "
                              f"(known: {', '.join(CLIP_TIMM)})")
        return CLIP_TIMM[base], kwargs
    if family in ("dinov2", "timm"):  # timm models themselves
        return model.partition(".")[0], {**kwargs, **(ident.get("model_kwargs") or {})}
    if family == "sam":
        if model == "tiny":
            return TINY_SAM[0], {**kwargs, **TINY_SAM[1]}
        if model not in SAM_TIMM:
            raise LookupError(f"no timm equivalent known for SAM model '{model}' (known: {', '.join(SAM_TIMM)})")
        return SAM_TIMM[model], kwargs
    raise LookupError(f"no timm equivalent known for teacher family '{family}'")


def images_per_second(model: torch.nn.Module, *, resolution: int, batch: int, device: torch.device,
                      warmup: int | None = None, min_seconds: float | None = None, max_iters: int = 50) -> float:
    """Forward images/s of `model` on random (batch, 3, R, R) inputs, after `warmup` iterations.

    Raises:
        EvaluationError: the batch does not fit in the device's memory.
    """
    cuda = device.type == "cuda"
    warmup = warmup if warmup is not None else (5 if cuda else 1)
    min_seconds = min_seconds if min_seconds is not None else (2.0 if cuda else 0.5)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    try:
        x = torch.randn(batch, 3, resolution, resolution, device=device)
        with torch.inference_mode(), autocast(device):
            for _ in range(warmup):
                model(x)
            sync()
            start, iters = time.perf_counter(), 0
            while True:
                model(x)
                sync()
                iters += 1
                elapsed = time.perf_counter() - start
                if (iters >= 3 and elapsed >= min_seconds) or iters >= max_iters:
                    return batch * iters / elapsed
    except RuntimeError as e:  # CUDA's OutOfMemoryError, or the CPU allocator's refusal
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise EvaluationError(f"--throughput-batch {batch}: out of memory at {resolution} px on {device}; "
                              "give a smaller one") from None


def measure_throughput(student: torch.nn.Module, teachers: dict[str, dict], *, resolution: int,
                       device: torch.device, batch: int | None = None, progress: bool = False, **timing) -> dict:
    """Images/s of the student (backbone + adaptors) and of each teacher architecture.

    Args:
        student: the loaded student on `device`.
        teachers: {name: the teacher group's attrs (identity, resolution)}.
        resolution: the student's input side.
        batch: images per forward (default 64 on CUDA, 4 on CPU).
        **timing: `warmup`, `min_seconds` for `images_per_second`.

    Returns:
        {'device', 'batch', 'dtype', 'student': {...}, 'teachers': {name: {...} or {'n/a': reason}}}.
    """
    import timm

    from ..cache.teachers import register_toy_models
    register_toy_models()  # the toy preset's towers are timm models of ours
    batch = batch or (64 if device.type == "cuda" else 4)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"device": name, "batch": batch, "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
           "student": {"resolution": resolution,
                       "images_per_s": images_per_second(student, resolution=resolution, batch=batch, device=device,
                                                         **timing)},
           "teachers": {}}
    with Progress("teacher throughput", total=len(teachers), unit="teachers", enabled=progress) as bar:
        for t, attrs in teachers.items():
            bar.advance()
            res = int(attrs["resolution"])
            try:
                arch, kwargs = timm_equivalent(attrs["identity"], res)
            except LookupError as e:
                out["teachers"][t] = {"n/a": str(e), "resolution": res}
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = timm.create_model(arch, pretrained=False, **kwargs).to(device).eval()
            out["teachers"][t] = {"architecture": arch, "resolution": res,
                                  "overrides": {k: v for k, v in kwargs.items() if k not in ("img_size", "num_classes")},
                                  "images_per_s": images_per_second(model, resolution=res, batch=batch, device=device,
                                                                    **timing)}
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out
