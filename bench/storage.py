"""Storage: bytes per image-view and fidelity of each target codec, per teacher.

Teacher outputs of view 0 of generated photos (bench precision: bf16 autocast on CUDA, fp32 on
CPU) are encoded with `radio_distill.cache.codecs` and written to Zarr v3 arrays laid out as the
store lays them out (chunk = one (sample, view), shard = all samples, the store's own zstd-1 +
crc32c codecs from cache/store.py); bytes per view are the bytes on disk (shard index included).
Fidelity is the per-token cosine of the decoded spatial map (bilinearly unpooled to the teacher's
grid where pooled) to the unquantised output: mean and min. The summary is stored fp16 (the
build's default) in every row and counted in the bytes.

Codecs: `fp16`; `int8` (the default: per-token absmax int8 + one fp16 scale per token); `int8+pool2`
(2x2 average pooling first, `--pool`); and `pca<k>+int8`, which the store does NOT have yet: a
channel PCA computed here (basis fit on the first half of the images, measured on the other half,
which is also the half every other codec is measured on), keeping the top k components per token,
stored as int8 + scale, the basis once per store (`basis_kb`). It shows what such a codec would give.

Caveat: the teachers have random weights. Trained ViTs have a few huge outlier channels and a
steep PCA spectrum; random ones do not, so per-token absmax int8 may do worse and PCA better on
real weights. The cosines here test the codecs, not the real teachers' compressibility.

Targets: a default >= 2x smaller than raw fp16 at cos >= 0.999; an option >= 4x smaller at cos >= 0.99.

    python bench/storage.py --json storage.json      # CLIP-L/14@224, DINOv2-L/14@224, SAM-B@1024 on 64 photos
    python bench/storage.py --quick                  # CPU smoke: tiny teachers, 8 photos
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import zarr

import common
from radio_distill.cache import codecs
from radio_distill.cache.store import _compressors  # the store's own zstd-1 + crc32c chain
from radio_distill.cache.teachers import build_teacher
from radio_distill.ops import autocast, normalise

FULL = dict(teachers="three", images=64, batch_size=16, pca=[0.5, 0.25, 0.125])
QUICK = dict(teachers="tiny", images=8, batch_size=8, pca=[0.5, 0.25, 0.125])
DEFAULT_RATIO, DEFAULT_COS, OPTION_RATIO, OPTION_COS = 2.0, 0.999, 4.0, 0.99


def teacher_outputs(spec, args, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(summary (N, D) | None, spatial (N, h, w, C)) float32 on the CPU for N generated photos."""
    teacher = build_teacher(spec, device=device)
    pixels = common.load_views(common.make_jpegs(args.images, work=args.work), args.images, teacher.resolution)
    summaries, spatials = [], []
    for b in range(0, len(pixels), args.batch_size):
        x = normalise(pixels[b:b + args.batch_size].to(device), teacher.mean, teacher.std)
        with torch.inference_mode(), autocast(device):
            summary, spatial = teacher(x)
        summaries.append(None if summary is None else summary.float().cpu())
        spatials.append(spatial.float().cpu())
    del teacher
    common.free(device)
    return (None if summaries[0] is None else torch.cat(summaries)), torch.cat(spatials)


def disk_bytes(arrays: dict[str, torch.Tensor]) -> int:
    """Bytes on disk of (N, ...) arrays stored as the store stores targets: (N, V=1, ...), chunk =
    one (sample, view), one shard of all N, zstd-1 + crc32c."""
    with tempfile.TemporaryDirectory() as tmp:
        root = zarr.open_group(tmp, mode="w")
        for name, value in arrays.items():
            a = value.cpu().numpy()[:, None]
            arr = root.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(1, 1, *a.shape[2:]),
                                    shards=a.shape, compressors=_compressors(), fill_value=0)
            arr[...] = a
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file() and p.name != "zarr.json")


def pca_basis(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C) fit tokens -> mean (C,), basis (C, k) of the top-k principal components."""
    t = tokens.double()
    mean = t.mean(0)
    cov = (t - mean).T @ (t - mean) / max(1, len(t) - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending
    return mean.float(), vecs[:, -k:].flip(1).float()


def encodings(fit: torch.Tensor, x: torch.Tensor, args) -> dict[str, tuple[dict, torch.Tensor, int]]:
    """codec name -> (arrays to store, decoded spatial at the teacher grid, once-per-store bytes)."""
    out = {}
    for name, factor, codec in (("fp16", 1, "fp16"), ("int8", 1, "int8"), (f"int8+pool{args.pool}", args.pool, "int8")):
        values, scale = codecs.encode(codecs.pool(x, factor), codec)
        back = codecs.unpool(codecs.decode(values, scale), tuple(x.shape[1:3]))
        out[name] = ({"spatial": values} | ({} if scale is None else {"spatial_scale": scale}), back, 0)
    C = x.shape[-1]
    for fraction in args.pca:
        k = max(1, round(C * fraction))
        mean, basis = pca_basis(fit.reshape(-1, C), k)
        values, scale = codecs.encode((x - mean) @ basis, "int8")  # (N, h, w, k)
        back = codecs.decode(values, scale) @ basis.T + mean
        out[f"pca{k}+int8"] = ({"spatial": values, "spatial_scale": scale}, back, (C * k + C) * 2)
    return out


def bench_teacher(spec, args, device) -> list[dict]:
    summary, spatial = teacher_outputs(spec, args, device)
    half = len(spatial) // 2
    fit, x = spatial[:half], spatial[half:]  # PCA fits on `fit`; every codec is measured on `x`
    n, (h, w, C) = len(x), x.shape[1:]
    summary_arrays = {} if summary is None else {"summary": summary[half:].half()}
    raw = h * w * C * 2 + (0 if summary is None else summary.shape[-1] * 2)  # raw fp16 bytes per view
    rows = []
    for name, (arrays, back, once) in encodings(fit, x, args).items():
        per_view = disk_bytes({**arrays, **summary_arrays}) / n
        cos = codecs.token_cosine(x, back)
        rows.append({"teacher": common.label(spec), "codec": name, "grid": f"{h}x{w}x{C}",
                     "stored_shape": "x".join(map(str, arrays["spatial"].shape[1:])),
                     "bytes_per_view": per_view, "kb_per_view": per_view / 1e3, "raw_fp16_bytes": raw,
                     "x_vs_raw_fp16": raw / per_view, "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "basis_kb": once / 1e3 if once else None, "default": name == "int8",
                     "computed_in_benchmark_only": name.startswith("pca")})
    fp16 = next(r for r in rows if r["codec"] == "fp16")["bytes_per_view"]
    for r in rows:
        r["x_vs_fp16_zstd"] = fp16 / r["bytes_per_view"]
        r["meets"] = ", ".join(
            label for label, ok in ((f">={DEFAULT_RATIO:g}x @ cos {DEFAULT_COS}", r["x_vs_raw_fp16"] >= DEFAULT_RATIO
                                     and r["cos_mean"] >= DEFAULT_COS),
                                    (f">={OPTION_RATIO:g}x @ cos {OPTION_COS}", r["x_vs_raw_fp16"] >= OPTION_RATIO
                                     and r["cos_mean"] >= OPTION_COS)) if ok) or "-"
    return rows


COLUMNS = [("teacher", "teacher", ""), ("codec", "codec", ""), ("stored_shape", "stored h x w x C", ""),
           ("kb_per_view", "KB/view", ".1f"), ("x_vs_raw_fp16", "x vs raw fp16", ".2f"),
           ("x_vs_fp16_zstd", "x vs fp16+zstd", ".2f"), ("cos_mean", "cos mean", ".6f"), ("cos_min", "cos min", ".6f"),
           ("basis_kb", "basis KB/store", ".0f"), ("meets", "meets", "")]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--teachers", help="preset: three (default), tiny, clip, dinov2, sam, or a comma list")
    p.add_argument("--images", type=int, help="photos: half fit the PCA basis, half are measured")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--pool", type=int, default=2, help="pooling factor of the int8+pool row")
    p.add_argument("--pca", type=float, nargs="+", help="PCA ranks as fractions of the channels")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device(args.device)
    rows = [row for spec in common.teacher_specs(args.teachers) for row in bench_teacher(spec, args, device)]
    targets = {}
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == teacher]
        default = next(r for r in mine if r["default"])
        targets[teacher] = {
            "default_2x_at_0.999": default["x_vs_raw_fp16"] >= DEFAULT_RATIO and default["cos_mean"] >= DEFAULT_COS,
            "option_4x_at_0.99": [r["codec"] for r in mine
                                  if r["x_vs_raw_fp16"] >= OPTION_RATIO and r["cos_mean"] >= OPTION_COS]}
    payload = common.meta(device, __file__, args.argv, images_measured=args.images - args.images // 2,
                          images_fit=args.images // 2, compressors="zstd(level=1) + crc32c, as cache/store.py",
                          random_init=True, targets=targets)
    out = common.report(payload, rows, COLUMNS, args.json_out,
                        title="Target storage per image-view (random-init teachers; pca rows are not a store codec yet)")
    for teacher, t in targets.items():
        print(f"{teacher}: default int8 >= 2x @ cos 0.999: {'yes' if t['default_2x_at_0.999'] else 'NO'}; "
              f">= 4x @ cos 0.99: {', '.join(t['option_4x_at_0.99']) or 'none'}")
    return out


if __name__ == "__main__":
    main()
