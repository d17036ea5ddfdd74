"""Student throughput: inference and train-step images/s per model and resolution.

Students are built with RADIO-like heads (CLIP-L 768/1024, DINOv2-L 1024/1024, SAM -/256)
unless --backbone-only. CUDA runs under bf16 autocast, CPU in fp32. E-RADIO inference is timed
after ``switch_to_deploy`` (BN folded). A resolution is rounded to the model's input stride
(e.g. 224 -> 224 for patch 14, 512 -> 518), and the table shows the size actually used.

    python bench/student_speed.py --device cuda --batch-size 64 --json speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import time

import torch

from radio_distill.student import TeacherDims, create_student

MODELS = ["eradio_small", "eradio_base", "eradio_large", "vit_small_patch16_224",
          "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_clip_224"]
TEACHERS = {"clip": TeacherDims(768, 1024), "dinov2": TeacherDims(1024, 1024), "sam": TeacherDims(None, 256)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loss(out) -> torch.Tensor:
    parts = [out.backbone.spatial.float().square().mean()]
    for f in out.teachers.values():
        parts.append(f.spatial.float().square().mean())
        if f.summary is not None:
            parts.append(f.summary.float().square().mean())
    return sum(parts)


def _time(fn, steps: int, device: torch.device) -> float:
    for _ in range(2):  # warm-up (allocations, kernel selection, first-call library init)
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - start


def bench(name: str, res: int, *, device: torch.device, batch: int, steps: int, heads: bool) -> dict:
    model = create_student(name, teachers=TEACHERS if heads else {}).to(device)
    s = model.input_stride
    side = max(s, round(res / s) * s)
    x = torch.randn(batch, 3, side, side, device=device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with amp:
            loss = _loss(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s = _time(train_step, steps, device)
    del opt
    infer_model = copy.deepcopy(model).eval().switch_to_deploy()

    @torch.inference_mode()
    def infer():
        with amp:
            infer_model(x)

    infer_s = _time(infer, steps, device)
    params = sum(p.numel() for p in model.backbone.parameters())
    return {"model": name, "resolution": side, "batch": batch, "backbone_params_m": round(params / 1e6, 1),
            "infer_img_s": round(batch * steps / infer_s, 2), "train_img_s": round(batch * steps / train_s, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--resolutions", type=int, nargs="+", default=[224, 512])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backbone-only", action="store_true", help="no adaptor heads")
    p.add_argument("--json", dest="json_out", help="write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    rows = []
    for model in args.models:
        for res in args.resolutions:
            rows.append(bench(model, res, device=device, batch=args.batch_size, steps=args.steps,
                              heads=not args.backbone_only))
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"device: {name}; {precision}; batch {args.batch_size}; {args.steps} timed steps; "
          f"heads: {'none' if args.backbone_only else 'clip+dinov2+sam'}")
    print(f"{'model':28s} {'res':>5s} {'params(M)':>10s} {'infer img/s':>12s} {'train img/s':>12s}")
    for r in rows:
        print(f"{r['model']:28s} {r['resolution']:5d} {r['backbone_params_m']:10.1f} "
              f"{r['infer_img_s']:12.2f} {r['train_img_s']:12.2f}")
    if args.json_out:
        meta = {"device": name, "precision": precision, "torch": torch.__version__,
                "steps": args.steps, "heads": not args.backbone_only}
        with open(args.json_out, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
