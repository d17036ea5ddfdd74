"""Fast teachers: our teacher forward (`build_teacher(spec)(x)`) vs the stock library forward.

Same weights, same input (view 0 of generated photos at the teacher's resolution, normalised):
  - SAM: our path runs the image encoder's attention through SDPA (`use_sdpa` in
    cache/teachers.py); stock = a deep copy of the same encoder with segment_anything's own
    `Attention` class put back.
  - CLIP: stock = `model.visual(x)` (open_clip); DINOv2: stock = timm `forward_features(x)`. Our
    path calls exactly these and only reshapes, so here the target is "no slower than stock".
img/s is the median of `--repeats` interleaved timings of `--steps` batches each; cosine is per
token (and per summary vector) of our output to stock's, at the benchmark precision (bf16 autocast
+ inference_mode on CUDA, fp32 on CPU) and in fp32 on a few images (the implementation check).
`--compile [FAMILY ...]` also times `torch.compile` of our path (first-call compile seconds reported apart).

Targets: SAM >= 1.5x stock with cos >= 0.9999; CLIP and DINOv2 at least as fast as stock.

    python bench/teachers.py --compile sam --json teachers.json      # H100: CLIP-L/14, DINOv2-L/14, SAM-B
    python bench/teachers.py --quick                                 # CPU smoke: tiny teachers
"""

from __future__ import annotations

import copy
import statistics

import torch

import common
from radio_distill.store import codecs
from radio_distill.cache.teachers import build_teacher
from radio_distill.ops import autocast, normalise

FULL = dict(teachers="three", batch_size=None, sam_batch_size=16, steps=10, repeats=3, images=16, check_images=2)
QUICK = dict(teachers="tiny", batch_size=8, sam_batch_size=8, steps=3, repeats=2, images=8, check_images=2)
BATCH = 128  # CLIP and DINOv2 on CUDA unless --batch-size
SAM_SPEEDUP, SAM_COS, NOISE = 1.5, 0.9999, 0.98  # NOISE: "as fast as stock" allows 2% timing noise


def stock_forward(teacher):
    """(call, to_targets): the stock library call on the same weights, and its output as
    (summary (B, D) | None, spatial (B, h, w, C)) for the cosine."""
    family, model = teacher.spec.family, teacher.model
    if family == "sam":
        from segment_anything.modeling.image_encoder import Attention

        encoder = copy.deepcopy(model.image_encoder)
        swapped = [blk for blk in encoder.blocks if type(blk.attn) is not Attention]
        assert swapped, "our SAM teacher no longer uses its own attention class; nothing to compare"
        for blk in encoder.blocks:
            blk.attn.__class__ = Attention  # segment_anything's explicit softmax(q kᵀ + rel-pos) attention
        return encoder, lambda out: (None, out.permute(0, 2, 3, 1))  # (B, C, h, w) -> (B, h, w, C)
    if family == "clip":
        def to_targets(out):
            pooled, tokens = out
            side = int(tokens.shape[1] ** 0.5)
            return pooled, tokens.reshape(tokens.shape[0], side, side, -1)
        return model.visual, to_targets
    if family == "dinov2":
        def to_targets(out):
            side = int((out.shape[1] - model.num_prefix_tokens) ** 0.5)
            return out[:, 0], out[:, model.num_prefix_tokens:].reshape(out.shape[0], side, side, -1)
        return model.forward_features, to_targets
    raise ValueError(f"no stock forward for family '{family}'")


def cosines(ours, stock) -> dict:
    """Mean and min per-token cosine of spatial maps, and of summaries where there are any."""
    out = {}
    for key, a, b in (("spatial", ours[1], stock[1]), ("summary", ours[0], stock[0])):
        if a is None:
            continue
        cos = codecs.token_cosine(b.float(), a.float())
        out[f"{key}_cos_mean"], out[f"{key}_cos_min"] = float(cos.mean()), float(cos.min())
    return out


def bench_teacher(spec, args, device: torch.device) -> dict:
    teacher = build_teacher(spec, device=device)
    stock, to_targets = stock_forward(teacher)
    batch = args.sam_batch_size if spec.family == "sam" else (args.batch_size or BATCH)
    listing = common.make_jpegs(args.images, work=args.work)
    pixels = common.load_views(listing, args.images, teacher.resolution).to(device)
    x = normalise(pixels, teacher.mean, teacher.std)
    x = x[torch.arange(batch) % len(x)].contiguous()  # (B, 3, R, R)
    amp = autocast(device)

    def run(fn, inputs):
        with torch.inference_mode(), amp:
            return fn(inputs)

    paths = {"stock": stock, "ours": teacher}
    compile_s = None
    compile_ = args.compile is not None and (not args.compile or spec.family in args.compile)
    if compile_:
        paths["compiled"] = torch.compile(teacher)
        watch = common.Stopwatch(device)
        with watch("compile"):  # the first call of a compiled module is its compilation
            run(paths["compiled"], x)
        compile_s = watch.seconds["compile"]
    row = {"teacher": common.label(spec), "family": spec.family, "resolution": teacher.resolution, "batch": batch}

    # speed: interleaved repeats, median
    times = {name: [] for name in paths}
    peaks = {}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(common.timed(lambda: run(fn, x), steps=args.steps, device=device))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
    for name, t in times.items():
        row[f"{name}_img_s"] = batch * args.steps / statistics.median(t)
        if peaks:
            row[f"{name}_peak_gib"] = round(peaks[name], 2)
    row["speedup"] = row["ours_img_s"] / row["stock_img_s"]
    if compile_:
        row["compiled_speedup"] = row["compiled_img_s"] / row["stock_img_s"]
        row["compile_s"] = compile_s

    # fidelity: at the benchmark precision, and in fp32 (the implementation itself)
    stock_out = to_targets(run(stock, x))  # the whole batch: a compiled module keeps its input shape
    row.update(cosines(run(teacher, x), stock_out))
    if compile_:
        compiled = cosines(run(paths["compiled"], x), stock_out)
        row["compiled_spatial_cos_mean"], row["compiled_spatial_cos_min"] = (compiled["spatial_cos_mean"],
                                                                            compiled["spatial_cos_min"])
    del stock_out
    n = min(args.check_images, len(x))
    with torch.inference_mode():
        fp32 = cosines(teacher(x[:n].float()), to_targets(stock(x[:n].float())))
    row.update({f"fp32_{k}": v for k, v in fp32.items()})

    # targets: SAM needs a path (eager or compiled) >= 1.5x stock at cos >= 0.9999; CLIP/DINOv2 eager >= stock
    candidates = [(row["speedup"], row["spatial_cos_mean"])]
    if compile_:
        candidates.append((row["compiled_speedup"], row["compiled_spatial_cos_mean"]))
    need = SAM_SPEEDUP if spec.family == "sam" else NOISE
    row["target"] = f">= {SAM_SPEEDUP}x stock, cos >= {SAM_COS}" if spec.family == "sam" else ">= stock speed"
    row["cos_ok"] = row["fp32_spatial_cos_mean"] >= SAM_COS and all(c >= SAM_COS for _, c in candidates)
    row["speed_ok"] = any(sp >= need for sp, _ in (candidates if spec.family == "sam" else candidates[:1]))
    row["met"] = row["cos_ok"] and row["speed_ok"]
    del teacher, stock, paths
    common.free(device)
    return row


COLUMNS = [("teacher", "teacher", ""), ("batch", "batch", "d"), ("stock_img_s", "stock img/s", "n"),
           ("ours_img_s", "ours img/s", "n"), ("speedup", "x stock", ".2f"),
           ("compiled_img_s", "compiled img/s", "n"), ("compiled_speedup", "x stock", ".2f"),
           ("spatial_cos_mean", "cos mean", ".6f"), ("spatial_cos_min", "cos min", ".6f"),
           ("compiled_spatial_cos_min", "compiled cos min", ".6f"), ("fp32_spatial_cos_min", "fp32 cos min", ".6f"), ("target", "target", ""), ("met", "met", "")]


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--teachers", help="preset: three (default), tiny, clip, dinov2, sam, or a comma list")
    p.add_argument("--batch-size", type=int, help=f"CLIP and DINOv2 batch (default {BATCH} on CUDA)")
    p.add_argument("--sam-batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, help="interleaved timings per path; the median is reported")
    p.add_argument("--images", type=int, help="generated photos used as input (repeated to fill a batch)")
    p.add_argument("--check-images", type=int, help="images in the cosine checks")
    p.add_argument("--compile", nargs="*", metavar="FAMILY",
                   help="also time torch.compile of our path: of every teacher, or of the families named")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device(args.device)
    rows = [bench_teacher(spec, args, device) for spec in common.teacher_specs(args.teachers)]
    payload = common.meta(device, __file__, args.argv, steps=args.steps, repeats=args.repeats,
                          compile=args.compile, random_init=True)
    columns = COLUMNS if args.compile is not None else [c for c in COLUMNS if not c[0].startswith("compiled")]
    return common.report(payload, rows, columns, args.json_out,
                         title="Teacher forward: ours vs stock library (same weights, same input; random init)")


if __name__ == "__main__":
    main()
