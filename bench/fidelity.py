"""How many cached views match online distillation, and does multi-resolution training cost fidelity?

The same tiny student (timm `test_vit`, fixed seed and steps) is distilled
  - from stores of the tiny teachers with V = 1, 2, 4, 8 cached views per image (view 0 the centred
    square, the others random resized crops), at one side, and (largest V) at two sides drawn per
    step (`--resolution-policy random`);
  - online, the upper bound a cache approximates: every step the tiny teachers run on a fresh random
    resized crop of each image (`view_boxes` with a per-step seed and `crop_resize`, so the crops
    are drawn as the cached views are) and their outputs are the targets. Same initialisation,
    image order, schedule, optimizer, losses and `DistillStep` as `radio-train`; it lives here only.
Reported per run: held-out fidelity per teacher (mean cosine of the student's adaptor outputs to the
cached targets; spatial maps resized to the teacher grid) on held-out images of another seed, at
view 0 and at fresh random crops (views 1..3 of a held-out store built with another cache seed), at
each student side; and the cost: the store's build (one teacher pass per view, once), the training
time per epoch, and the whole run's seconds per epoch (cached: build / epochs + train; online:
teachers + student every epoch).

Real teachers are not measured: the tiny preset has seeded random weights, so these are the numbers
of a toy problem, run on the CPU in minutes.

    python bench/fidelity.py --json fidelity.json --plot fidelity.png   # 160 + 40 images, 300 steps a run
    python bench/fidelity.py --quick                                    # smoke: a handful of images and steps

Letters: B batch, R side in pixels.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig
from radio_distill.store.dataset import load_rgb
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import build_teacher, tiny_teachers
from radio_distill.store.views import crop_resize, view_boxes
from radio_distill.ops import normalise
from radio_distill.student import TeacherDims, create_student, load_student, save_student
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import get_lr, train
from radio_distill.store.reader import CacheReader, StepSampler, TeacherMeta, decode_targets
from radio_distill.train.step import DistillStep, make_optimizer, to_grid

FULL = dict(images=160, held_out=40, size=96, views="1,2,4,8", steps=300, batch_size=16, sides="64,96")
QUICK = dict(images=16, held_out=8, size=64, views="1,2", steps=4, batch_size=4, sides="32,48")
HELD_VIEWS = 4  # view 0 + 3 fresh random crops of each held-out image
ONLINE_CROPS = 1 << 16  # the online run's crops at step s: view 1 of `view_boxes` seeded ONLINE_CROPS + s


def build(data, out: Path, *, views: int, seed: int) -> float:
    """Seconds the build of a tiny-teacher store of `data` with `views` views took (built here once;
    the seconds are kept beside the store, so a rerun reports them)."""
    took = out.with_suffix(".seconds.json")
    if not (out / "zarr.json").is_file() or not took.is_file():
        start = time.perf_counter()
        build_cache(CacheConfig(data=data, out=out, teachers=tuple(tiny_teachers()), views=views, seed=seed,
                                shard_size=16, workers=2, overwrite=True), progress=False)
        took.write_text(json.dumps(time.perf_counter() - start))
    return json.loads(took.read_text())


def online(cfg: TrainConfig, reader: CacheReader, specs=None) -> dict[str, float]:
    """Distil `cfg.student` into `cfg.out` as `train(cfg)` does from `reader`'s store, but with the
    teachers of `specs` (default: the tiny preset) in the loop on a fresh random resized crop of every
    image every step.

    Returns:
        seconds of 'teachers' (their crops and forwards) and of 'student' (image decode, its crop, the step).
    """
    device = torch.device("cpu")
    teachers = [build_teacher(s, device=device) for s in (specs or tiny_teachers())]
    infos = {t.spec.name: t.info() for t in teachers}
    metas = [TeacherMeta(name, i.summary_dim, i.spatial_dim, i.grid, (), {}) for name, i in infos.items()]
    torch.manual_seed(cfg.seed)
    model = create_student(cfg.student, teachers={m.name: TeacherDims(m.summary_dim, m.spatial_dim, cfg.upsample.get(m.name, 1))
                                                  for m in metas},
                           **cfg.student_overrides).to(device).train()
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = DistillStep(model, optimizer, metas, loss=cfg.loss, grad_clip=cfg.grad_clip, device=device)
    order = StepSampler(reader.indices(holdout=cfg.holdout), views=1, resolution=cfg.resolution,
                        batch_size=cfg.batch_size, seed=cfg.seed, start_step=0, steps=cfg.steps)  # the cached runs' order
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    min_side = max(t.resolution for t in teachers)
    watch = common.Stopwatch(device)
    for s in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(s, lr=cfg.lr, min_lr=cfg.min_lr, warmup=warmup, steps=cfg.steps)
        with watch("student"):
            ids = [reader.ids[i] for i, _ in order.global_batch(s)]
            decoded = [load_rgb(reader.root_dir / i, min_side=min_side) for i in ids]  # (image, span, size)
            boxes = [view_boxes(*size, views=2, seed=ONLINE_CROPS + s, sample_id=i)[1]
                     for i, (_, _, size) in zip(ids, decoded)]
            pixels = crops(decoded, boxes, cfg.resolution)
        with watch("teachers"), torch.no_grad():
            targets = {}
            for teacher in teachers:
                summary, spatial = teacher(normalise(crops(decoded, boxes, teacher.resolution), teacher.mean, teacher.std))
                targets[teacher.spec.name] = {"summary": summary, "spatial": spatial}
        with watch("student"):
            step.update(pixels, targets)
    save_student(model, Path(cfg.out) / "student")
    return watch.seconds


def crops(decoded: list, boxes: list[np.ndarray], side: int) -> torch.Tensor:
    """(B, 3, R, R) uint8: each box of its decoded image (`load_rgb`'s (image, span, size)) at side R."""
    return torch.from_numpy(np.stack([crop_resize(image, box, side, span=span)
                                      for (image, span, _), box in zip(decoded, boxes)])).permute(0, 3, 1, 2)


@torch.inference_mode()
def fidelity(model, reader: CacheReader, *, side: int, views: range, batch: int = 32) -> dict[str, float]:
    """{'<teacher>/<summary|spatial>': mean cosine} of `model` at `side` over `views` of every sample."""
    items = [(int(i), v) for v in views for i in reader.indices(holdout=0.0)]
    loader = DataLoader(reader.dataset(resolution=side), batch_sampler=[items[s:s + batch]
                                                                          for s in range(0, len(items), batch)])
    sums: dict[str, list[float]] = {}
    for part in loader:
        targets = decode_targets(part, reader.teachers, torch.device("cpu"))
        out = model(normalise(part["pixels"], model.mean, model.std)).teachers
        for t in reader.teachers:
            if targets[t.name]["summary"] is not None:
                cos = F.cosine_similarity(out[t.name].summary.float(), targets[t.name]["summary"], dim=-1)
                sums.setdefault(f"{t.name}/summary", []).extend(cos.tolist())
            cos = F.cosine_similarity(to_grid(out[t.name].spatial, t.grid), targets[t.name]["spatial"].flatten(1, 2),
                                      dim=-1).mean(1)  # (B,) mean over the teacher grid's tokens
            sums.setdefault(f"{t.name}/spatial", []).extend(cos.tolist())
    return {k: float(np.mean(v)) for k, v in sums.items()}


def plot(rows: list[dict], path: str, *, side: int) -> None:
    """Held-out fresh-crop fidelity per teacher target vs V (trained and evaluated at `side`), the online
    run as a horizontal line, one panel per target."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    picked = [r for r in rows if r["held"] == "crops" and r["side"] == side and r["trained"] == str(side)]
    cached, [live] = [r for r in picked if r["views"] != "online"], [r for r in picked if r["views"] == "online"]
    names = [k for k in live if "/" in k]
    fig = Figure(figsize=(2.6 * len(names), 2.6), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        ax.plot([r["views"] for r in cached], [r[name] for r in cached], "o-", label="cached, V views")
        ax.axhline(live[name], color="C3", linestyle="--", label="online (fresh crop every step)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["views"] for r in cached], [str(r["views"]) for r in cached])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("cached views V")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=8)
    fig.axes[0].set_ylabel("held-out fresh-crop cos")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(path)


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="training images")
    p.add_argument("--held-out", type=int, help="held-out images (another seed)")
    p.add_argument("--size", type=int, help="side of the generated images")
    p.add_argument("--views", help="cached views per image to compare, e.g. 1,2,4,8")
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sides", help="student sides: the first alone, then all of them (random per step)")
    p.add_argument("--seed", type=int, default=0,
                   help="the students' initialisation and image order (the stores' and the online crops stay)")
    p.add_argument("--plot", help="draw fresh-crop fidelity vs V, and the online line, into this PNG")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    device = torch.device("cpu")  # toy sizes: the CPU is the honest place for them
    views, sides = [int(v) for v in args.views.split(",")], tuple(int(s) for s in args.sides.split(","))
    epochs = args.steps * args.batch_size / args.images
    work = args.work / f"fidelity-{args.images}-{args.size}"
    train_data = make_sample_dataset(work / "train", images=args.images, size=args.size, seed=0)
    held_data = make_sample_dataset(work / "held", images=args.held_out, size=args.size, seed=1)
    build(held_data, work / "held.zarr", views=HELD_VIEWS, seed=1)
    held = CacheReader(work / "held.zarr")
    base = TrainConfig(store=work, out=work, student="test_vit", steps=args.steps, batch_size=args.batch_size,
                       resolution=sides[0], lr=2e-3, holdout=0.0, workers=0, log_every=args.steps,
                       checkpoint_every=args.steps, device="cpu", seed=args.seed)
    runs = []  # (V or 'online', sides trained, run folder, cost)
    for v in views:
        store = work / f"train-v{v}.zarr"
        build_s = build(train_data, store, views=v, seed=0)
        for trained in ([sides[:1], sides] if len(sides) > 1 and v == max(views) else [sides[:1]]):
            run = work / f"run-v{v}-{'-'.join(map(str, trained))}-seed{args.seed}"
            if not (run / "student").is_dir():
                train(replace(base, store=store, out=run, resolution=trained), progress=False)
            with (run / "metrics.csv").open() as f:  # the loop's own rate: reads, decodes and steps, no setup
                train_s = args.images / float(list(csv.DictReader(f))[-1]["images_per_s"])
            runs.append((v, trained, run,
                         {"build_s": build_s, "train_s": train_s, "run_s": build_s / epochs + train_s}))
    run = work / f"run-online-{sides[0]}-seed{args.seed}"
    seconds = online(replace(base, out=run), CacheReader(work / f"train-v{views[0]}.zarr"))  # its images, in order
    per_epoch = {k: v / epochs for k, v in seconds.items()}
    runs.append(("online", sides[:1], run, {"teacher_s": per_epoch["teachers"], "train_s": per_epoch["student"],
                                              "run_s": per_epoch["teachers"] + per_epoch["student"]}))
    rows = []
    for v, trained, run, cost in runs:
        model = load_student(run)
        for side in sides:
            for what, seen in (("view 0", range(1)), ("crops", range(1, HELD_VIEWS))):
                fid = fidelity(model, held, side=side, views=seen)
                rows.append({"views": v, "trained": ",".join(map(str, trained)), "side": side, "held": what,
                             **fid, "mean": float(np.mean(list(fid.values()))), **cost})
    names = [k for k in rows[0] if "/" in k]
    columns = ([("views", "V", ""), ("trained", "trained at", ""), ("side", "eval side", "d"), ("held", "held-out", "")]
               + [(k, k, ".4f") for k in names]
               + [("mean", "mean", ".4f"), ("build_s", "build s", ".1f"), ("teacher_s", "teachers s/epoch", ".2f"),
                  ("train_s", "train s/epoch", ".2f"), ("run_s", f"s/epoch over {epochs:g}", ".2f")])
    payload = common.meta(device, __file__, args.argv, images=args.images, held_out=args.held_out, size=args.size,
                          steps=args.steps, batch_size=args.batch_size, epochs=epochs, seed=args.seed, student="test_vit",
                          teachers="tiny")
    if args.plot:
        plot(rows, args.plot, side=sides[0])
    return common.report(payload, rows, columns, args.json_out,
                         title="Held-out fidelity (mean cos) vs cached views, online, and student sides — tiny teachers")


if __name__ == "__main__":
    main()
