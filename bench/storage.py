"""Storage: bytes per image-view and fidelity of each target codec, per teacher.

Teacher outputs of view 0 of generated photos (bench precision: bf16 autocast on CUDA, fp32 on
CPU) are encoded with `radio_distill.store.codecs` and written to Zarr v3 arrays laid out as the
store lays them out (chunk = one (sample, view), shard = all samples, the store's own zstd-1 +
crc32c codecs from store/group.py); bytes per view are the bytes on disk (shard index included).
Fidelity is the per-token cosine of the decoded spatial map (bilinearly unpooled to the teacher's
grid where pooled) to the unquantised output: mean and min. The summary is stored fp16 (the
build's default) in every row and counted in the bytes.

Codecs (`store/codecs.py`): `fp16`; `int8` (the default: per-token absmax int8 + one fp16 scale per
token); `int8+pool2` (2x2 average pooling first, `--pool`); and the calibrated ones a `--fidelity`
budget may pick: `rot-int8` (PHI-S rotation, then per-token int8) and `pca<k>-int8` (k leading
components, k a power of two). Their transforms are fit (`cache/calibrate.py`) on the first half of
the images and every codec is measured on the other half; the transform is stored once per store
(`basis_kb`). `picked at 0.99` marks what `--fidelity 0.99` would pick among the rows shown.

Caveat: the teachers have random weights. Trained ViTs have a few huge outlier channels and a
steep PCA spectrum; random ones do not, so per-token absmax int8 may do worse and PCA better on
real weights. The cosines here test the codecs, not the real teachers' compressibility. Hence also
`known_structure`: features whose structure is known, made here (not by a teacher), each codec
measured on held-back tokens and the budget's pick marked `chosen`:
- `outlier_100x`, `outlier_10x`: 1024 N(0, 1) channels around a fixed mean; in half the tokens one
  of 4 fixed channels reaches 100 (10) -- the massive activations of trained CLIP and DINOv2;
  budget 0.999. `cos_rest_*` is the cosine over the other 1020 channels: what outliers crush.
- `low_rank`: 1024 channels, 99.5 % of the energy in 64 components plus isotropic noise (the
  64-component projection has cos ~ sqrt(0.995) = 0.9975); budget 0.99.
Their ratio is raw bytes per token vs fp16 (random values do not compress), the basis not counted.

`radio25` (bytes only): the RADIOv2.5 teacher set -- DFN CLIP-H/14@378 (open_clip), SigLIP-SO400M/14@384
(timm), DINOv2-g/14-reg4@224, SAM ViT-H@1024 -- built on the meta device (architecture, no weights, no
memory) and run there for their output shapes; raw bytes per image-view per codec (summaries fp16) and
the store for ImageNet-1k x 2 views. zstd is not applied (1.07-1.09x on the measured rows above). No
fidelity: that needs trained weights (random ones have neither outliers nor a PCA spectrum to find).

Targets: a default >= 2x smaller than raw fp16 at cos >= 0.999; an option >= 4x smaller at cos >= 0.99;
outlier_100x: rot-int8 mean cos >= 0.999 and min >= 0.99; low_rank: budget 0.99 picks >= 8x smaller
than fp16 at mean cos >= 0.99.

    python bench/storage.py --json storage.json      # CLIP-L/14@224, DINOv2-L/14@224, SAM-B@1024 on 64 photos
    python bench/storage.py --quick                  # CPU smoke: tiny teachers, 8 photos
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import zarr

import common
from known_features import KNOWN_C, OUTLIER_CHANNELS, low_rank, outliers
from radio_distill.store import codecs
from radio_distill.cache import calibrate
from radio_distill.store.group import compressors  # the store's own zstd-1 + crc32c chain
from radio_distill.cache.teachers import build_teacher
from radio_distill.ops import autocast, normalise

FULL = dict(teachers="three", images=64, batch_size=16, pca=[0.5, 0.25, 0.125], tokens=16384)
QUICK = dict(teachers="tiny", images=8, batch_size=8, pca=[0.5, 0.25, 0.125], tokens=4096)
DEFAULT_RATIO, DEFAULT_COS, OPTION_RATIO, OPTION_COS = 2.0, 0.999, 4.0, 0.99
KNOWN_BUDGETS = {"outlier_100x": 0.999, "outlier_10x": 0.999, "low_rank": 0.99}
KNOWN_CODECS = ("fp16", "int8", "rot-int8", "pca64-int8", "pca64-fp16", "pca128-int8")


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
                                    shards=a.shape, compressors=compressors(), fill_value=0)
            arr[...] = a
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file() and p.name != "zarr.json")


def encodings(fit: torch.Tensor, x: torch.Tensor, args) -> dict[str, tuple[dict, torch.Tensor, int]]:
    """codec name -> (arrays to store, decoded spatial at the teacher grid, once-per-store bytes)."""
    out = {}
    for name, factor, codec in (("fp16", 1, "fp16"), ("int8", 1, "int8"), (f"int8+pool{args.pool}", args.pool, "int8")):
        values, scale = codecs.encode(codecs.pool(x, factor), codec)
        back = codecs.unpool(codecs.decode(values, scale), tuple(x.shape[1:3]))
        out[name] = ({"spatial": values} | ({} if scale is None else {"spatial_scale": scale}), back, 0)
    C = x.shape[-1]
    stats = calibrate.Moments(C).add(fit).statistics()
    ks = dict.fromkeys(2 ** int(math.log2(C * f)) for f in args.pca if C * f >= 1)
    for codec in ["rot-int8"] + [f"pca{k}-int8" for k in ks if k < C]:
        transform = (stats.mean.float(), calibrate.basis(codec, stats))
        values, scale = codecs.encode(x, codec, transform)
        back = codecs.decode(values, scale, transform)
        out[codec] = ({"spatial": values, "spatial_scale": scale}, back, transform[1].numel() * 4 + C * 8)
    return out


RADIO25 = (("DFN CLIP-H/14@378", "ViT-H-14-378-quickgelu", 378), ("SigLIP-SO400M/14@384", "vit_so400m_patch14_siglip_384", 384),
           ("DINOv2-g/14-reg4@224", "vit_giant_patch14_reg4_dinov2", 224), ("SAM ViT-H@1024", "vit_h", 1024))
RADIO25_CODECS = ("fp16", "int8", "pca128-int8", "pca64-int8", "pca32-int8")


def radio25_shapes() -> list[tuple[str, int, int, int | None]]:
    """(label, spatial tokens, spatial channels C, summary dims D or None) of the RADIOv2.5 set, from
    forwards of the real architectures on the meta device (shapes only: no weights, no compute)."""
    import open_clip
    import timm

    from radio_distill.cache.teachers import TeacherSpec

    out = []
    with torch.device("meta"):
        (clip_label, clip_name, r), (siglip_label, siglip_name, rs), (dino_label, dino_name, rd), (sam_label, sam_name, rm) = RADIO25
        clip = open_clip.create_model(clip_name, pretrained=None, device="meta").visual
        clip.output_tokens = True
        summary, tokens = clip(torch.zeros(1, 3, r, r))
        out.append((clip_label, tokens.shape[1], tokens.shape[2], summary.shape[-1]))
        siglip = timm.create_model(siglip_name, pretrained=False)
        tokens = siglip.forward_features(torch.zeros(1, 3, rs, rs))
        out.append((siglip_label, tokens.shape[1] - siglip.num_prefix_tokens, tokens.shape[2],
                    siglip.forward_head(tokens, pre_logits=True).shape[-1]))
        for label, family, name, res in ((dino_label, "dinov2", dino_name, rd), (sam_label, "sam", sam_name, rm)):
            info = build_teacher(TeacherSpec(family, family, name, resolution=res, random_init=True), device="meta").info()
            out.append((label, info.grid[0] * info.grid[1], info.spatial_dim, info.summary_dim))
    return out


def radio25_bytes() -> list[dict]:
    """Raw MB (1e6 bytes) per image-view of each RADIOv2.5 teacher per spatial codec (+ the fp16
    summary), of the whole set, and the ImageNet-1k x 2 views store in TB."""
    rows, total = [], {c: 0.0 for c in RADIO25_CODECS}
    for label, tokens, channels, summary in radio25_shapes():
        row = {"teacher": label, "spatial": f"{tokens}x{channels}", "summary": summary, "unit": "MB/view"}
        for codec in RADIO25_CODECS:
            row[codec] = (tokens * codecs.token_bytes(codec, channels) + 2 * (summary or 0)) / 1e6
            total[codec] += row[codec]
        if "SAM" in label:  # 64x64 -> 32x32
            row["int8+pool2"] = tokens // 4 * codecs.token_bytes("int8", channels) / 1e6
        rows.append(row)
    rows.append({"teacher": "whole set", "unit": "MB/view", **total})
    rows.append({"teacher": "ImageNet-1k x 2 views", "unit": "TB",
                 **{c: v * 1e6 * common.IMAGENET_TRAIN * 2 / 1e12 for c, v in total.items()}})
    return rows


def known_structure(tokens: int) -> list[dict]:
    """One entry per case and codec (KNOWN_CODECS and the budget's pick): fit on `tokens` tokens,
    measured on `tokens // 2` others."""
    cases = {"outlier_100x": lambda seed, t: outliers(t, 100, seed), "outlier_10x": lambda seed, t: outliers(t, 10, seed),
             "low_rank": lambda seed, t: low_rank(t, seed)}
    rest = torch.ones(KNOWN_C, dtype=torch.bool)
    rest[list(OUTLIER_CHANNELS)] = False
    entries = []
    for case, make in cases.items():
        stats, held = calibrate.Moments(KNOWN_C).add(make(0, tokens)).statistics(), make(1, tokens // 2)
        choice = calibrate.choose(stats, held, KNOWN_BUDGETS[case])
        for codec in dict.fromkeys(KNOWN_CODECS + (choice.codec,)):
            b = calibrate.basis(codec, stats)
            transform = None if b is None else (stats.mean.float(), b)
            back = codecs.decode(*codecs.encode(held, codec, transform), transform)
            cos, cos_rest = codecs.token_cosine(held, back), codecs.token_cosine(held[:, rest], back[:, rest])
            entries.append({"case": case, "codec": codec, "budget": KNOWN_BUDGETS[case],
                            "ratio_vs_fp16": codecs.token_bytes("fp16", KNOWN_C) / codecs.token_bytes(codec, KNOWN_C),
                            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                            "cos_rest_mean": float(cos_rest.mean()) if case != "low_rank" else None,
                            "cos_rest_min": float(cos_rest.min()) if case != "low_rank" else None,
                            "chosen": codec == choice.codec})
    return entries


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
                     "basis_kb": once / 1e3 if once else None, "default": name == "int8"})
    fp16 = next(r for r in rows if r["codec"] == "fp16")["bytes_per_view"]
    picked = next((r for r in sorted(rows, key=lambda r: r["bytes_per_view"])
                   if r["cos_mean"] >= OPTION_COS and "pool" not in r["codec"]), None)
    for r in rows:
        r["picked_at_0.99"] = r is picked
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
           ("basis_kb", "basis KB/store", ".0f"), ("picked_at_0.99", "picked at 0.99", ""), ("meets", "meets", "")]
KNOWN_COLUMNS = [("case", "case", ""), ("codec", "codec", ""), ("budget", "budget", ""),
                 ("ratio_vs_fp16", "x vs fp16", ".1f"), ("cos_mean", "cos mean", ".6f"), ("cos_min", "cos min", ".6f"),
                 ("cos_rest_mean", "rest cos mean", ".6f"), ("cos_rest_min", "rest cos min", ".6f"),
                 ("chosen", "chosen", "")]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--teachers", help="preset: three (default), tiny, clip, dinov2, sam, or a comma list")
    p.add_argument("--images", type=int, help="photos: half fit the PCA basis, half are measured")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--pool", type=int, default=2, help="pooling factor of the int8+pool row")
    p.add_argument("--pca", type=float, nargs="+", help="PCA ranks as fractions of the channels (rounded down to a power of two)")
    p.add_argument("--tokens", type=int, help="known-structure tokens the transforms are fit on (half as many measured)")
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
    known = known_structure(args.tokens)
    known_targets = {
        "outlier_100x_rot_int8": any(e["case"] == "outlier_100x" and e["codec"] == "rot-int8" and e["cos_mean"] >= 0.999
                                     and e["cos_min"] >= 0.99 for e in known),
        "low_rank_budget_8x": any(e["case"] == "low_rank" and e["chosen"] and e["ratio_vs_fp16"] >= 8
                                  and e["cos_mean"] >= 0.99 for e in known)}
    common.report({"device": "generated features", "precision": "fp32", "torch": torch.__version__, "date": ""},
                  known, KNOWN_COLUMNS, None, title=f"Known-structure features ({args.tokens} tokens fit, "
                                                    f"{args.tokens // 2} measured)")
    radio25 = radio25_bytes()
    common.report({"device": "meta device (shapes only)", "precision": "-", "torch": torch.__version__, "date": ""},
                  radio25, [("teacher", "teacher", ""), ("spatial", "tokens x C", ""), ("unit", "unit", "")]
                  + [(c, c, ".3f") for c in RADIO25_CODECS + ("int8+pool2",)], None,
                  title="RADIOv2.5 teacher set: raw size per image-view (summary fp16) and of an ImageNet-1k x 2 views store")
    payload = common.meta(device, __file__, args.argv, images_measured=args.images - args.images // 2,
                          images_fit=args.images // 2, compressors="zstd(level=1) + crc32c, as store/group.py",
                          random_init=True, targets=targets, known_structure=known, known_structure_targets=known_targets,
                          radio25_bytes_per_view=radio25)
    out = common.report(payload, rows, COLUMNS, args.json_out,
                        title="Target storage per image-view (random-init teachers)")
    print(f"known structure: outlier_100x rot-int8 >= 0.999/0.99: {'yes' if known_targets['outlier_100x_rot_int8'] else 'NO'}; "
          f"low_rank budget 0.99 >= 8x: {'yes' if known_targets['low_rank_budget_8x'] else 'NO'}")
    for teacher, t in targets.items():
        print(f"{teacher}: default int8 >= 2x @ cos 0.999: {'yes' if t['default_2x_at_0.999'] else 'NO'}; "
              f">= 4x @ cos 0.99: {', '.join(t['option_4x_at_0.99']) or 'none'}")
    return out


if __name__ == "__main__":
    main()
