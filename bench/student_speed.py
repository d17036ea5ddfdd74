"""Student throughput: inference and train-step images/s per model and resolution.

Students are built with RADIO-like heads (CLIP-L 768/1024, DINOv2-L 1024/1024, SAM -/256)
unless --backbone-only. CUDA runs under bf16 autocast, CPU in fp32. E-RADIO inference is timed
after ``switch_to_deploy`` (BN folded). A resolution is rounded to the model's input stride
(e.g. 224 -> 224 for patch 14, 512 -> 518), and the table shows the size actually used.

A ViTDet student run with the plain ViT of its width and depth (ViT-Ti/S/B/16) also gets its speed
as a multiple of that ViT's at the same side ("x ViT" columns).

    python bench/student_speed.py --device cuda --batch-size 64 --json speed.json
    python bench/student_speed.py --models vit_small_patch16_224 vitdet_small vit_base_patch16_224 vitdet_base \
        --resolutions 512 1024 --backbone-only --batch-size 8     # ViTDet next to the plain ViT
    python bench/student_speed.py --quick            # CPU smoke: test_vit, test_eradio at 64 px
"""

from __future__ import annotations

import copy

import torch

import common
from radio_distill.ops import autocast
from radio_distill.student import TeacherDims, create_student

MODELS = ["eradio_small", "eradio_base", "eradio_large", "vit_small_patch16_224",
          "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_clip_224"]
TEACHERS = {"clip": TeacherDims(768, 1024), "dinov2": TeacherDims(1024, 1024), "sam": TeacherDims(None, 256)}
FULL = dict(models=MODELS, resolutions=[224, 512], batch_size=32, steps=10)
QUICK = dict(models=["test_vit", "test_eradio"], resolutions=[64], batch_size=2, steps=2)
PLAIN_VIT = {"vitdet_tiny": "vit_tiny_patch16_224", "vitdet_small": "vit_small_patch16_224",
             "vitdet_base": "vit_base_patch16_224"}  # same width, depth and heads


def _loss(out) -> torch.Tensor:
    parts = [out.backbone.spatial.float().square().mean()]
    for f in out.teachers.values():
        parts.append(f.spatial.float().square().mean())
        if f.summary is not None:
            parts.append(f.summary.float().square().mean())
    return sum(parts)


def bench(name: str, res: int, *, device: torch.device, batch: int, steps: int, heads: bool, train: bool) -> dict:
    model = create_student(name, teachers=TEACHERS if heads else {}).to(device)
    s = model.input_stride
    side = max(s, round(res / s) * s)
    x = torch.randn(batch, 3, side, side, device=device)
    amp = autocast(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with amp:
            loss = _loss(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s = common.timed(train_step, steps=steps, device=device) if train else None
    del opt
    infer_model = copy.deepcopy(model).eval().switch_to_deploy()

    @torch.inference_mode()
    def infer():
        with amp:
            infer_model(x)

    infer_s = common.timed(infer, steps=steps, device=device)
    params = sum(p.numel() for p in model.backbone.parameters())
    return {"model": name, "resolution": side, "batch": batch, "backbone_params_m": round(params / 1e6, 1),
            "infer_img_s": round(batch * steps / infer_s, 2),
            "train_img_s": round(batch * steps / train_s, 2) if train else None}


def versus_plain_vit(rows: list[dict]) -> None:
    """Adds to each ViTDet row its img/s as a multiple of the plain ViT's row at the same side, where there is one."""
    plain = {(r["model"], r["resolution"]): r for r in rows}
    for r in rows:
        vit = plain.get((PLAIN_VIT.get(r["model"]), r["resolution"]))
        if vit:
            r["infer_x_vit"] = round(r["infer_img_s"] / vit["infer_img_s"], 2)
            if r["train_img_s"] and vit["train_img_s"]:
                r["train_x_vit"] = round(r["train_img_s"] / vit["train_img_s"], 2)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--resolutions", type=int, nargs="+")
    p.add_argument("--models", nargs="+")
    p.add_argument("--steps", type=int)
    p.add_argument("--backbone-only", action="store_true", help="no adaptor heads")
    p.add_argument("--infer-only", action="store_true", help="no train-step timing (CPU runs at 1024 px)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)

    device = torch.device(args.device)
    rows = []
    for model in args.models:
        for res in args.resolutions:
            rows.append(bench(model, res, device=device, batch=args.batch_size, steps=args.steps,
                              heads=not args.backbone_only, train=not args.infer_only))
            common.free(device)
    versus_plain_vit(rows)
    payload = common.meta(device, __file__, args.argv, batch=args.batch_size, steps=args.steps,
                          heads=not args.backbone_only)
    columns = [("model", "model", ""), ("resolution", "res", "d"), ("backbone_params_m", "params(M)", ".1f"),
               ("infer_img_s", "infer img/s", ".2f"), ("train_img_s", "train img/s", ".2f")]
    if any("infer_x_vit" in r for r in rows):
        columns += [("infer_x_vit", "infer x ViT", ".2f"), ("train_x_vit", "train x ViT", ".2f")]
    return common.report(payload, rows, columns, args.json_out,
                         title=f"Student throughput; batch {args.batch_size}; {args.steps} timed steps; "
                               f"heads: {'none' if args.backbone_only else 'clip+dinov2+sam'}")


if __name__ == "__main__":
    main()
