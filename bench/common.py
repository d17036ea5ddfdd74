"""Shared pieces of the benchmarks: generated photos, teacher presets, stores, timing, tables and JSON.

Every benchmark script has `main(argv) -> dict`: it prints a table and returns (and with `--json`
writes) `{**meta(...), "results": [...]}`, where `meta` records the device name, torch and library
versions, the date and the exact command. `--quick` switches a script's defaults to the CPU smoke
scale (tiny teachers, a handful of images); explicit flags still win.

Data is generated on the machine: JPEG files sized like ImageNet photos (500x375 or 375x500,
quality 90, ~110 KB), smooth colour fields with shapes, blur and film-grain texture, so decoding
costs what a real photo costs. Nothing is downloaded; teachers are the real architectures with
seeded random weights (`TeacherSpec(..., random_init=True)`), or the tiny preset.

Letters: B batch, R side in pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from radio_distill.cache.teachers import TeacherSpec, identity, tiny_teachers

BENCH = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_WORK", BENCH / "_work"))  # generated images and stores (git-ignored)
PHOTO_SIZE = (500, 375)  # ImageNet-like: ~500x375, 20% portrait
PHOTO_QUALITY = 90
IMAGENET_TRAIN = 1_281_167  # images per ImageNet-1k epoch, for per-epoch figures

REAL = {
    "clip": TeacherSpec("clip", "clip", "ViT-L-14", resolution=224, random_init=True),
    "dinov2": TeacherSpec("dinov2", "dinov2", "vit_large_patch14_reg4_dinov2", resolution=224, random_init=True),
    "sam": TeacherSpec("sam", "sam", "vit_b", resolution=1024, random_init=True),
}
LABELS = {"clip": "CLIP ViT-L/14@224", "dinov2": "DINOv2 ViT-L/14-reg4@224", "sam": "SAM ViT-B@1024"}
TINY = {s.name: s for s in tiny_teachers()}
PRESETS = {  # name -> teacher names; 'tiny*' presets use the toy sizes
    "three": ("clip", "dinov2", "sam"), "clip": ("clip",), "dinov2": ("dinov2",), "sam": ("sam",),
    "tiny": ("clip", "dinov2", "sam"), "tiny-clip": ("clip",), "tiny-dinov2": ("dinov2",), "tiny-sam": ("sam",),
}


def teacher_specs(preset: str) -> list[TeacherSpec]:
    """Teacher specs of a preset name (see PRESETS), or of a comma list like 'clip,sam' / 'tiny-sam'."""
    if preset in PRESETS:
        table = TINY if preset.startswith("tiny") else REAL
        return [table[n] for n in PRESETS[preset]]
    if "," in preset:
        return [s for part in preset.split(",") for s in teacher_specs(part)]
    raise SystemExit(f"unknown teacher preset '{preset}'; choose from {', '.join(PRESETS)} or a comma list of them")


def label(spec: TeacherSpec) -> str:
    return f"tiny {spec.family} (toy size)" if spec.preset == "tiny" else LABELS.get(spec.name, spec.model)


# --- arguments ---------------------------------------------------------------------------------

def parser(doc: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark has: --quick, --device, --json, --work."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke scale: tiny teachers, a handful of images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", dest="json_out", help="write the results here")
    p.add_argument("--work", type=Path, default=WORK, help="generated images and stores (reused between runs)")
    return p


def parse(p: argparse.ArgumentParser, argv, *, full: dict, quick: dict) -> argparse.Namespace:
    """Parse, then fill every flag left at None from the `quick` or `full` defaults."""
    args = p.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# --- device, timing ----------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, *, steps: int, device: torch.device, warmup: int = 2) -> float:
    """Seconds for `steps` calls of `fn` after `warmup` untimed calls (allocations, kernel selection)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


class Stopwatch:
    """`with watch('phase'):` adds the phase's seconds (CUDA synchronised at both ends) to `watch.seconds`."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def precision(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "fp32"


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- results -----------------------------------------------------------------------------------

def meta(device: torch.device, script: str, argv: list[str], **extra) -> dict:
    """What every result carries: device, versions, date, the exact command."""
    versions = {}
    for dist in ("timm", "open_clip_torch", "segment-anything", "zarr", "tensorstore", "numcodecs", "ray", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"benchmark": Path(script).stem, "device": device_name(device), "precision": precision(device),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "python": platform.python_version(), "versions": versions, "cpu_cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", Path(script).resolve().relative_to(BENCH.parent).as_posix()] + argv),
            **extra}


def report(payload: dict, rows: list[dict], columns: list[tuple[str, str, str]], json_out: str | None,
           *, title: str) -> dict:
    """Print `title` and a table of `rows` (columns: key, header, format spec or "n" for `num`), write JSON;
    return the payload."""
    print(f"{title}\n{payload['device']}; {payload['precision']}; torch {payload['torch']}; {payload['date']}")
    widths = [max(len(h), *(len(_cell(r.get(k), f)) for r in rows)) if rows else len(h) for k, h, f in columns]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths))))
    for r in rows:
        print("  ".join(_cell(r.get(k), f).rjust(w) if i else _cell(r.get(k), f).ljust(w)
                        for i, ((k, _, f), w) in enumerate(zip(columns, widths))))
    payload = {**payload, "results": rows}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(payload, indent=2, default=_jsonable))
    return payload


def num(value: float) -> str:
    """A rate for a table: whole numbers from 100 up, else 3 significant digits."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if fmt == "n":
        return num(value)
    return format(value, fmt) if fmt else str(value)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


# --- generated photos --------------------------------------------------------------------------

def photo(k: int, *, seed: int = 0) -> Image.Image:
    """Photo k of the generated set: deterministic in (seed, k), 500x375 (1 in 5 portrait)."""
    rng = np.random.default_rng([seed, k])
    w, h = PHOTO_SIZE if rng.random() >= 0.2 else PHOTO_SIZE[::-1]
    field = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    texture = rng.normal(128, 40, (h // 2, w // 2)).clip(0, 255).astype(np.uint8)
    texture = Image.fromarray(texture).resize((w, h), Image.Resampling.BICUBIC)
    grain = np.asarray(texture, np.float32) - 128 + rng.normal(0, 12, (h, w))  # luminance grain, as film/sensor
    pixels = np.asarray(image, np.float32) + grain[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write_photo(args: tuple[Path, int, int]) -> int:
    path, k, seed = args
    tmp = path.with_suffix(".tmp")
    photo(k, seed=seed).save(tmp, "JPEG", quality=PHOTO_QUALITY)
    tmp.rename(path)  # never a half-written JPEG, even if a run is killed
    return path.stat().st_size


def make_jpegs(n: int, *, work: Path = WORK, seed: int = 0) -> Path:
    """Generate (once) photos 0..n-1 under `work`/images and return a list file of the first n.

    `radio-cache build` takes the list file as its dataset (ids relative to the list's folder), so
    runs of 1k, 4k and 16k images share the same files.
    """
    folder = Path(work) / f"images-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{k:06d}.jpg" for k in range(n)]
    todo = [(folder / name, k, seed) for k, name in enumerate(names) if not (folder / name).is_file()]
    if len(todo) > 64 and (os.cpu_count() or 1) > 1:  # fork: the children only run numpy and PIL
        with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("fork")) as pool:
            list(pool.map(_write_photo, todo, chunksize=32))
    else:
        for item in todo:
            _write_photo(item)
    listing = folder / f"list-{n}.txt"
    if not listing.is_file():
        listing.write_text("".join(f"{name}\n" for name in names))
    return listing


def jpeg_stats(listing: Path) -> dict:
    """Mean file size and pixel size of a generated list."""
    folder = listing.parent
    names = listing.read_text().split()
    sizes = [(folder / n).stat().st_size for n in names]
    return {"images": len(names), "mean_kb": round(float(np.mean(sizes)) / 1e3, 1),
            "size": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (20% portrait)", "quality": PHOTO_QUALITY}


def load_views(listing: Path, count: int, resolution: int) -> torch.Tensor:
    """View 0 (centred square, as the build's first view) of the first `count` photos: (B, 3, R, R) uint8."""
    from radio_distill.store.dataset import load_rgb
    from radio_distill.store.views import crop_resize, view_boxes

    folder, names = listing.parent, listing.read_text().split()
    out = []
    for k in range(count):
        image, span, size = load_rgb(folder / names[k % len(names)], min_side=resolution)
        box = view_boxes(*size, views=1, seed=0, sample_id=names[k % len(names)])[0]
        out.append(torch.from_numpy(crop_resize(image, box, resolution, span=span)).permute(2, 0, 1))
    return torch.stack(out)


# --- stores ------------------------------------------------------------------------------------

def store_path(work: Path, preset: str, n: int) -> Path:
    return Path(work) / "stores" / f"{preset}-{n}.zarr"


def usable_store(path: Path, specs: list[TeacherSpec], n: int) -> bool:
    """A complete store at `path` of these teachers over n images with one view (any shard size)."""
    from radio_distill.store.group import done_shards, open_store
    from radio_distill.errors import RadioDistillError

    if not (path / "zarr.json").is_file():
        return False
    try:
        root = open_store(path)
    except RadioDistillError:
        return False
    settings = root.attrs["settings"]
    return (settings["teachers"] == json.loads(json.dumps({s.name: identity(s) for s in specs}))
            and root.attrs["num_samples"] == n and root.attrs["views"] == 1
            and bool(done_shards(path, root, [s.name for s in specs]).all()))


def ensure_store(preset: str, n: int, *, work: Path = WORK, shard_size: int = 256, batch_size: int = 32,
                 workers: int | None = None) -> Path:
    """The store of `preset` over the first n generated photos (one view, default codecs): reused
    when complete (e.g. left by bench/build.py), else built with `build_cache` through Ray
    (targets do not depend on the batch size)."""
    from radio_distill.cache.build import build_cache
    from radio_distill.cache.config import CacheConfig

    specs = teacher_specs(preset)
    path = store_path(work, preset, n)
    if usable_store(path, specs, n):
        return path
    listing = make_jpegs(n, work=work)
    cfg = CacheConfig(data=listing, out=path, teachers=tuple(specs), views=1, shard_size=shard_size,
                      batch_size=batch_size, workers=workers, overwrite=True)
    report_ = build_cache(cfg, progress=False)
    assert report_["complete"], report_
    return path


# --- the student step of radio-train --------------------------------------------------------------

def student_step(student: str, teachers, device: torch.device, *, lr: float = 1e-3, seed: int = 0):
    """radio-train's own step (`train.step.DistillStep`, default losses, AdamW, grad clip 1) for a fresh
    `student`; call it on a loader batch, or `.update(pixels, targets)` on live targets.

    Args:
        teachers: `TeacherMeta`s (from `CacheReader.teachers`, or made for live teachers).
    """
    from radio_distill.student import TeacherDims, create_student
    from radio_distill.train.losses import LossConfig
    from radio_distill.train.step import DistillStep, make_optimizer

    torch.manual_seed(seed)
    dims = {t.name: TeacherDims(t.summary_dim, t.spatial_dim) for t in teachers}
    model = create_student(student, teachers=dims).to(device).train()
    return DistillStep(model, make_optimizer(model, lr=lr, weight_decay=0.05), teachers, loss=LossConfig(),
                       grad_clip=1.0, device=device)


def loader_steps(reader, indices, step, *, resolution: int, batch_size: int, warmup: int,
                 steps: int, workers: int, device: torch.device, seed: int = 0) -> dict:
    """Run `warmup` + `steps` batches of `CacheReader.loader` (spawned workers, pinned memory on CUDA)
    through `step` (a `student_step`; None: only move and decode the batch, i.e. the data path alone).

    Returns:
        measured over the `steps` batches: images_per_s, wait_s (blocked on the loader), compute_s
        (device copy, target decode and the step, synchronised), wait_fraction, and p50/max wait per step.
    """
    import gc

    from radio_distill.store.reader import decode_targets

    loader = reader.loader(indices, resolution=resolution, batch_size=batch_size, seed=seed, start_step=0,
                           steps=warmup + steps, workers=workers, pin_memory=device.type == "cuda")
    it = iter(loader)
    waits, computes = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        if step is None:
            batch["pixels"].to(device, non_blocking=True)
            decode_targets(batch, reader.teachers, device)
        else:
            step(batch)
        sync(device)
        t2 = time.perf_counter()
        if i >= warmup:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    del it, loader
    gc.collect()  # persistent workers end with their loader
    wall = sum(waits) + sum(computes)
    return {"images_per_s": batch_size * steps / wall, "wait_s": sum(waits), "compute_s": sum(computes),
            "wait_fraction": sum(waits) / wall, "wait_p50_ms": float(np.median(waits)) * 1e3,
            "wait_max_ms": max(waits) * 1e3}
