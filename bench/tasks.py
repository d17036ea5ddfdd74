"""Cached views and codecs judged by task scores, with the trained toy teachers (issue 20, item 4).

`bench/fidelity.py` and `bench/storage.py` measure cosines to random-weight teachers; here the
teachers know something (the `toy` preset: CLIP, DINOv2 and SAM trained on the generated world), so
every choice is scored by what `radio-eval` measures on held-out world scenes: kNN by shape
(DINOv2), zero-shot by shape name (CLIP), the dense linear probe's mIoU (DINOv2 and SAM maps) and
SAM point-prompt mask IoU against the ground truth.

- Codecs: one store per codec setting (fp16, int8 and the `--fidelity` budgets, which pick
  rotated int8 or PCA per target). The teacher columns are the task scores of the decoded cached
  targets themselves; bytes per view and the codecs picked come from the store.
- Views: the same student (fixed seed, steps, order) distilled from stores of V = 1, 2, 4, 8
  views per image, and online (the toy teachers on a fresh random resized crop of every image every
  step, `fidelity.online`), each then evaluated by `radio-eval` on the held-out split. Cost per
  epoch: the cached runs pay their build once over the run's epochs, online pays the teachers every
  step.

    python bench/tasks.py --json tasks.json     # 600 scenes, 300 steps of a conv-stem ViT-tiny at 128 px
    python bench/tasks.py --codecs '' --views 1,online --student eradio_small --steps 800 --upsample sam=2
    python bench/tasks.py --quick               # smoke: a handful of scenes and steps
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import common
from fidelity import online
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.cache.teachers import toy_teachers
from radio_distill.cache.text import write_text_embeddings
from radio_distill.cache.world import write_scenes
from radio_distill.evaluate.config import EvalConfig
from radio_distill.evaluate.report import evaluate
from radio_distill.store.inspect import store_info
from radio_distill.store.reader import CacheReader
from radio_distill.train.config import TrainConfig
from radio_distill.train.loop import train

FULL = dict(images=600, views="1,2,4,8,online", codecs="fp16,int8,0.999,0.99,0.95,0.9", steps=300, batch_size=32, side=128)
QUICK = dict(images=40, views="1,2,online", codecs="fp16,int8", steps=2, batch_size=8, side=128)
STUDENT = "vit_tiny_convstem_patch16_224"  # a plain ViT-tiny learns the shapes too slowly to compare anything (§13)
HOLDOUT = 0.2
SCENE_SEED = 5  # scenes the toy teachers never saw (they trained on seed 0, were scored on seed 1)
TASKS = (  # (column, report section, teacher, key path below the teacher's entry)
    ("kNN shape", "knn", "dinov2", ()),
    ("zero-shot shape", "zero_shot", "clip", ()),
    ("dense mIoU DINOv2", "dense", "dinov2", ()),
    ("dense mIoU SAM", "dense", "sam", ()),
    ("SAM point IoU", "sam", "sam", ("ground_truth",)),
)


def task_scores(report: dict, who: str) -> dict[str, float]:
    """{column: score} of `who` ('teacher' or 'student') from a `radio-eval` report."""
    out = {}
    for column, section, teacher, path in TASKS:
        entry = report[section].get("teachers", {}).get(teacher)
        for key in path:
            entry = (entry or {}).get(key)
        out[column] = float("nan") if not entry or who not in entry else float(entry[who])
    return out


def build(images: Path, out: Path, *, views: int, codec: str, batch_size: int) -> float:
    """Seconds the toy-teacher store build of `images` took (built once; kept beside the store, so a
    rerun reports them). `codec`: 'fp16' or 'int8' for every spatial target (summaries fp16), or a
    fidelity budget like '0.99'."""
    took = out.with_suffix(".seconds.json")
    if not (out / "zarr.json").is_file() or not took.is_file():
        budget = {None: float(codec)} if codec[0].isdigit() else None
        cfg = load_cache_config(teachers="toy", data=images, out=out, views=views, seed=0, shard_size=64, workers=2,
                                batch_size=batch_size, overwrite=True, fidelity=budget,
                                spatial_codec=None if budget else codec)
        start = time.perf_counter()
        build_cache(cfg, progress=False)
        write_text_embeddings(out, device="cpu")
        took.write_text(json.dumps(time.perf_counter() - start))
    return json.loads(took.read_text())


def evaluated(store: Path, run: Path) -> dict:
    """`radio-eval`'s report of `run` on `store` (computed once per run folder)."""
    path = run / "eval" / "report.json"
    if not path.is_file():
        evaluate(EvalConfig(store=store, run=run, out=run / "eval", workers=0, throughput=False, pictures=2,
                            probe_images=300, sam_images=120), progress=False)
    return json.loads(path.read_text())


def codec_rows(images: Path, work: Path, codecs: list[str], base: TrainConfig) -> list[dict]:
    rows = []
    for codec in codecs:
        store = work / f"codec-{codec}.zarr"
        build_s = build(images, store, views=1, codec=codec, batch_size=32)
        run = work / f"codec-{codec}-run"
        if not (run / "student").is_dir():  # one step: the teacher columns are what is scored here
            train(replace(base, store=store, out=run, steps=1), progress=False)
        info = store_info(store)
        picked = {f"{t}/{target}": i["storage"][target] for t, i in info["teachers"].items()  # a budget's choice
                  for target in ("summary", "spatial") if target in i["storage"]}
        rows.append({"codec": codec, **task_scores(evaluated(store, run), "teacher"),
                     "bytes_per_view": info["bytes"] / (info["samples"] * info["views"]), "build_s": build_s,
                     "picked": picked})
    return rows


def run_name(base: TrainConfig) -> str:
    """What tells one student run from another here: student, steps and --upsample."""
    return "-".join([base.student, str(base.steps)] + [f"{t}x{k}" for t, k in sorted(base.upsample.items())])


def view_rows(images: Path, work: Path, views: list[str], base: TrainConfig, *, epochs: float) -> list[dict]:
    """Rows of the students distilled from V cached views for each V of `views`, and online where it holds
    'online' (the V = 1 store's images in its order, evaluated on its held-out split), the teachers first."""
    rows = []
    for v in [int(v) for v in views if v != "online"]:
        store = work / f"views-{v}.zarr"
        build_s = build(images, store, views=v, codec="int8", batch_size=32)
        run = work / f"views-{v}-{run_name(base)}"
        if not (run / "student").is_dir():
            train(replace(base, store=store, out=run), progress=False)
        with (run / "metrics.csv").open() as f:  # the loop's own rate: reads, decodes and steps, no setup
            train_s = base.steps * base.batch_size / epochs / float(list(csv.DictReader(f))[-1]["images_per_s"])
        report = evaluated(store, run)
        rows.append({"run": f"cached V={v}", **task_scores(report, "student"), "build_s": build_s,
                     "teacher_s_epoch": build_s / epochs, "train_s_epoch": train_s,
                     "s_epoch": build_s / epochs + train_s})
    if "online" in views:
        store = work / "views-1.zarr"
        build(images, store, views=1, codec="int8", batch_size=32)
        run = work / f"online-{run_name(base)}"
        cfg = replace(base, store=store, out=run)
        if not (run / "student").is_dir():
            reader = CacheReader(store)
            seconds = online(cfg, reader, toy_teachers())
            (run / "seconds.json").write_text(json.dumps(seconds))
            (run / "run.json").write_text(json.dumps({"student": cfg.student, "store": str(store),  # as train() writes it
                                                      "store_settings": reader.settings,
                                                      "config": json.loads(json.dumps(asdict(cfg), default=str))}))
        seconds = json.loads((run / "seconds.json").read_text())
        rows.append({"run": "online", **task_scores(evaluated(store, run), "student"), "build_s": 0.0,
                     "teacher_s_epoch": seconds["teachers"] / epochs, "train_s_epoch": seconds["student"] / epochs,
                     "s_epoch": (seconds["teachers"] + seconds["student"]) / epochs})
    report = json.loads((run / "eval" / "report.json").read_text())
    rows.insert(0, {"run": "teachers (cached targets)", **task_scores(report, "teacher")})
    return rows


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--images", type=int, help="generated world scenes (a fifth held out by id hash)")
    p.add_argument("--views", help="cached views per image to compare, and 'online', e.g. 1,2,4,8,online")
    p.add_argument("--codecs", help="codec settings to compare: fp16, int8 or fidelity budgets, e.g. fp16,int8,0.99 "
                                    "('': none)")
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--upsample", default="", help="the students' --upsample, e.g. sam=2")
    p.add_argument("--steps", type=int, help="student steps per views run")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--side", type=int, help="student side")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    torch.manual_seed(0)
    work = args.work / f"tasks-{args.images}"
    images = work / "world" / "images"
    if not images.is_dir():
        write_scenes(work / "world", images=args.images, seed=SCENE_SEED)
    upsample = {t: int(k) for t, k in (pair.split("=") for pair in args.upsample.split(",") if pair)}
    base = TrainConfig(store=work, out=work, student=args.student, steps=args.steps, batch_size=args.batch_size,
                       resolution=args.side, lr=1e-3, holdout=HOLDOUT, workers=0, log_every=args.steps,
                       checkpoint_every=args.steps, device="cpu", seed=0, upsample=upsample)
    epochs = args.steps * args.batch_size / (args.images * (1 - HOLDOUT))
    codecs = codec_rows(images, work, [c for c in args.codecs.split(",") if c], base)
    views = view_rows(images, work, args.views.split(","), base, epochs=epochs)
    names = [c for c, *_ in TASKS]
    rows = [{"table": "codecs", **r} for r in codecs] + [{"table": "views", **r} for r in views]
    columns = ([("table", "table", ""), ("codec", "codec", ""), ("run", "run", "")] + [(n, n, ".3f") for n in names]
               + [("bytes_per_view", "bytes/view", ".0f"), ("build_s", "build s", ".1f"),
                  ("teacher_s_epoch", "teachers s/epoch", ".2f"), ("train_s_epoch", "train s/epoch", ".2f"),
                  ("s_epoch", f"s/epoch over {epochs:.3g}", ".2f")])
    payload = common.meta(torch.device("cpu"), __file__, args.argv, images=args.images, holdout=HOLDOUT,
                          steps=args.steps, batch_size=args.batch_size, side=args.side, student=args.student,
                          upsample=upsample,
                          teachers="toy", epochs=epochs)
    return common.report(payload, rows, columns, args.json_out,
                         title="Task scores on held-out world scenes: codecs (teacher targets) and cached views vs "
                               "online (students) — toy teachers")


if __name__ == "__main__":
    main()
