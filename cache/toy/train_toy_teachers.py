"""Train the toy teachers (CLIP, DINOv2, SAM) on generated scenes, save them, and score them loaded.

    python -m radio_distill.cache.toy.train_toy_teachers [--out DIR] [--threads 2]

Seeded end to end: train scenes from `--seed`, held-out scenes from `--heldout-seed` (another seed,
so other scenes). Each teacher is trained (see `fit.py`), saved as fp16 safetensors
(`clip.safetensors`, `dinov2.safetensors`, `sam.safetensors`; loading casts to fp32), then loaded
back through `toy_teachers(DIR)` and `build_teacher` (the weight-file specs `--teachers toy` uses)
and scored on held-out scenes (`score.py`). `scores.json` records scores, bars, seeds, sizes, steps
and wall times. Default output: this folder, where the preset finds its files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..teachers import (TOY_CLIP, TOY_DINOV2, TOY_SIDES, register_model_configs, register_toy_models, build_teacher, build_toy_sam,
                        toy_teachers)
from ..world import make_scenes
from . import fit, score
from .data import make_views

HERE = Path(__file__).parent
FAMILY_SEED = {"clip": 0, "dinov2": 1, "sam": 2}  # added to --seed: each family its own stream
BARS = {"clip_zero_shot": 0.9, "dinov2_knn": 0.9, "dinov2_dense_miou": 0.7, "sam_point_iou": 0.8}


@dataclass(frozen=True)
class ToyConfig:
    """How the toy teachers are made; `QUICK` is the test's short run."""

    seed: int = 0
    heldout_seed: int = 1
    train_scenes: int = 6000
    heldout_scenes: int = 400
    bank_scenes: int = 2000  # train scenes whose view 0 makes the kNN bank
    probe_scenes: int = 1000  # train scenes whose view 0 trains the dense probe
    clip_scenes: int = 12000  # CLIP sees only centred squares: twice the scenes keep it from overfitting them
    clip_steps: int = 4500  # small batches, many steps: more learnt per second than batch 64 (BENCHMARKS §18)
    clip_batch: int = 32
    dinov2_steps: int = 11000
    dinov2_batch: int = 24
    sam_steps: int = 2000
    sam_batch: int = 8
    sam_prompts: int = 4


QUICK = ToyConfig(train_scenes=240, heldout_scenes=60, bank_scenes=240, probe_scenes=60, clip_scenes=240, clip_steps=40,
                  clip_batch=64, dinov2_steps=40, dinov2_batch=32, sam_steps=150, sam_batch=8)


def new_clip():
    import open_clip

    register_model_configs()
    return open_clip.create_model(TOY_CLIP), open_clip.get_tokenizer(TOY_CLIP)


def new_dinov2():
    import timm

    register_toy_models()
    return timm.create_model(TOY_DINOV2, pretrained=False, num_classes=0, img_size=TOY_SIDES["dinov2"])


def save(model: torch.nn.Module, path: Path, *, note: str) -> None:
    """The model's state dict as fp16 safetensors (its float tensors; loading casts back to fp32)."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"note": note})


JOBS = (("clip", "sam"), ("dinov2",))  # two processes of one thread each: about equal work


def train(out: Path, cfg: ToyConfig, *, jobs: int = 2, log=print) -> dict:
    """Train, save into `out` and time the three teachers, in `jobs` processes of one thread each
    (one torch process of two threads loses most of its time at thread barriers on a shared machine).

    Returns:
        {'clip_s', 'dinov2_s', 'sam_s', 'scenes_s': seconds}.
    """
    if jobs == 1:
        return _train_job(out, cfg, ("clip", "dinov2", "sam"), torch.get_num_threads(), log)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    times = {}
    with ProcessPoolExecutor(len(JOBS), mp_context=mp.get_context("spawn")) as pool:
        for part in pool.map(_train_job, [out] * len(JOBS), [cfg] * len(JOBS), JOBS, [1] * len(JOBS)):
            times.update({k: max(v, times.get(k, 0)) for k, v in part.items()})
    return times


def _train_job(out: Path, cfg: ToyConfig, families: tuple[str, ...], threads: int, log=None) -> dict:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    log = log or (lambda msg: print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True))
    times = {}
    everything = make_scenes(max(cfg.train_scenes, cfg.clip_scenes if "clip" in families else 0), seed=cfg.seed)
    scenes = everything[:cfg.train_scenes]  # the same first scenes (one seeded stream), more of them for CLIP
    times["scenes_s"] = time.perf_counter() - start
    log(f"{len(everything)} train scenes in {times['scenes_s']:.0f} s")
    note = "radio-distill toy teacher, trained on generated scenes by cache/toy/train_toy_teachers.py"
    for family in families:
        t = time.perf_counter()
        torch.manual_seed(cfg.seed + FAMILY_SEED[family])
        seed, side = cfg.seed + FAMILY_SEED[family], TOY_SIDES[family]
        if family == "clip":
            model, tokenizer = new_clip()
            fit.fit_clip(model, tokenizer, make_views(everything, side), everything, steps=cfg.clip_steps,
                         batch=cfg.clip_batch, seed=seed, log=log)
        elif family == "dinov2":
            model = new_dinov2()
            fit.fit_dinov2(model, make_views(scenes, side, crops=1, seed=cfg.seed), scenes, steps=cfg.dinov2_steps,
                           batch=cfg.dinov2_batch, seed=seed, log=log)
        else:
            model = build_toy_sam()
            fit.fit_sam(model, make_views(scenes, side, crops=1, seed=cfg.seed), steps=cfg.sam_steps,
                        batch=cfg.sam_batch, prompts=cfg.sam_prompts, seed=seed, log=log)
        save(model, out / f"{family}.safetensors", note=note)
        times[f"{family}_s"] = time.perf_counter() - t
    return times


def evaluate(folder: Path, cfg: ToyConfig, *, families=("clip", "dinov2", "sam"), by: str = "shape") -> dict:
    """Each teacher's own scores, loaded from `folder` by the preset's specs, on `cfg`'s held-out scenes;
    `by="colour"` scores zero-shot and kNN by the main object's colour instead of its shape."""
    specs = {s.family: s for s in toy_teachers(folder)}
    heldout = make_scenes(cfg.heldout_scenes, seed=cfg.heldout_seed)
    out = {}
    if "clip" in families:
        out["clip_zero_shot"] = score.clip_zero_shot(build_teacher(specs["clip"]), heldout, by=by)
    if "dinov2" in families:
        train = make_scenes(max(cfg.bank_scenes, cfg.probe_scenes), seed=cfg.seed)
        d = score.dinov2_scores(build_teacher(specs["dinov2"]), train[:cfg.bank_scenes], train[:cfg.probe_scenes],
                                heldout, by=by)
        out["dinov2_knn"], out["dinov2_dense_miou"] = d["knn"], d["dense_miou"]
    if "sam" in families:
        s = score.sam_point_iou(build_teacher(specs["sam"]), heldout)
        out["sam_point_iou"], out["sam_objects"] = s["iou"], s["objects"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE, help="folder for the weights and scores.json (default: this one)")
    p.add_argument("--jobs", type=int, default=2, help="training processes of one thread each: 2 (CLIP, SAM | DINOv2) "
                   "or 1 (all in this process, on --threads)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of this process (scoring; training with --jobs 1)")
    p.add_argument("--quick", action="store_true", help="the test's short run (scores far below the bars)")
    p.add_argument("--score-only", action="store_true", help="score the files already in --out and update its scores.json, train nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else ToyConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)  # noqa: E731
    times = {} if args.score_only else train(args.out, cfg, jobs=args.jobs, log=log)
    t = time.perf_counter()
    scores = evaluate(args.out, cfg)
    by_colour = evaluate(args.out, cfg, families=("clip", "dinov2"), by="colour")
    by_colour.pop("dinov2_dense_miou")  # the probe is by shape class either way
    times["score_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    record = {
        "scores": scores, "scores_by_colour": by_colour, "bars": BARS,
        "passed": {k: scores[k] >= bar for k, bar in BARS.items()},
        "config": asdict(cfg), "wall_time": times,
        "machine": {"jobs": args.jobs, "threads": args.threads, "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "load_average_1m_at_end": os.getloadavg()[0]},
        "clip_objective": "contrastive on captions and phrasings, a quarter of them naming the colour without the shape "
                          "(every text true of an image is its positive), with supervised heads: shape (weight 3) and "
                          "colour of the main object from the image embedding, shape class per patch token",
        "dinov2_objective": "supervised heads (not self-distillation): shape, colour, size and centre of the largest "
                            "object from the CLS token; shape class and colour per patch token",
        "architectures": "the families' ViTs with a conv stem in place of the linear patch embedding (cache/toy/models.py)",
        "heldout": f"{cfg.heldout_scenes} scenes of seed {cfg.heldout_seed}, view 0 (centred square)",
        "weights": "fp16 safetensors, loaded as fp32 by the preset's specs",
    }
    path = args.out / "scores.json"
    if args.score_only and path.is_file():  # new scores beside the training run's record
        record = {**json.loads(path.read_text()), **{k: record[k] for k in ("scores", "scores_by_colour", "passed")}}
    path.write_text(json.dumps(record, indent=2) + "\n")
    for k, bar in BARS.items():
        print(f"{k:20s} {scores[k]:.3f}  (bar {bar})  {'ok' if scores[k] >= bar else 'BELOW'}")
    print("by colour: " + ", ".join(f"{k} {v:.3f}" for k, v in by_colour.items()))
    print(f"wall time {times['total_s']:.0f} s ({args.jobs} training jobs): "
          + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items() if k != "total_s"))
    return record


if __name__ == "__main__":
    main()
