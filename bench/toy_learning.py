"""Why the toy teachers learn slowly: a small CNN against the toy DINOv2 ViT on the same world (issue 20).

Each model is trained from scratch to name the main object's shape (5 classes) of the generated world's
views (`cache/toy/data.py`: the centred square and one random crop of each train scene, flipped at random),
batch 64, AdamW with the toy teachers' schedule (`fit.lr_at`), one thread; the held-out accuracy is on
view 0 of scenes from another seed, every `--every` steps. The models:

- `cnn`: four 3x3 conv blocks (16-32-64-64 channels, BatchNorm, ReLU, 2x2 max-pool) at 56 px, a linear
  head on the global max over positions.
- `vit-cls`: the first toy DINOv2 (timm `vit_small_patch14_reg4_dinov2` at depth 4, width 64, 112 px, an
  8 x 8 grid, linear patch embedding, layer scales started at 1 as `fit_dinov2` does), a linear head on
  the CLS token: how the teacher's summary is trained.
- `vit-max`: the same ViT, the head on the max over its patch tokens.
- `stem-cls`: today's toy DINOv2 (`vit_toy_reg4_dinov2`: the same ViT with a conv stem, 64 px, patch 8,
  `cache/toy/models.py`), the head on the CLS token.

    python bench/toy_learning.py --json toy-learning.json     # 6000 scenes, 1500 steps each
    python bench/toy_learning.py --models stem-cls             # one row
    python bench/toy_learning.py --quick                       # smoke
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import common
from radio_distill.cache.teachers import TOY_DINOV2, TOY_SIDES, register_toy_models
from radio_distill.cache.toy.data import flip, make_views
from radio_distill.cache.toy.fit import lr_at
from radio_distill.cache.world import SHAPES, make_scenes
from radio_distill.ops import normalise

FULL = dict(scenes=6000, heldout=400, steps=1500, every=250)
QUICK = dict(scenes=24, heldout=12, steps=4, every=2)
SIDE = 112  # the toy DINOv2's side: views are made once at it, the CNN's are shrunk to CNN_SIDE
CNN_SIDE = 56
MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


class SmallCNN(nn.Module):
    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.trunk, self.head = nn.Sequential(*layers), nn.Linear(c, len(SHAPES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) uint8 -> (B, 5) logits."""
        x = F.interpolate(pixels.float(), size=(CNN_SIDE, CNN_SIDE), mode="bilinear", antialias=True)
        return self.head(self.trunk(normalise(x, MEAN, STD)).amax((2, 3)))


class ToyViT(nn.Module):
    def __init__(self, pool: str, *, stem: bool = False):
        super().__init__()
        import timm

        register_toy_models()
        self.side = TOY_SIDES["dinov2"] if stem else SIDE
        self.vit = (timm.create_model(TOY_DINOV2, num_classes=0) if stem else
                    timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=SIDE, depth=4,
                                      embed_dim=64, num_heads=2))
        with torch.no_grad():
            for blk in self.vit.blocks:
                blk.ls1.gamma.fill_(1.0)
                blk.ls2.gamma.fill_(1.0)
        self.pool, self.head = pool, nn.Linear(self.vit.embed_dim, len(SHAPES))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        cfg = self.vit.pretrained_cfg
        if self.side != SIDE:
            pixels = F.interpolate(pixels.float(), size=(self.side, self.side), mode="bilinear", antialias=True)
        tokens = self.vit.forward_features(normalise(pixels, cfg["mean"], cfg["std"]))  # (B, prefix + 64, D)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, self.vit.num_prefix_tokens:].amax(1)
        return self.head(pooled)


MODELS = {"cnn": SmallCNN, "vit-cls": lambda: ToyViT("cls"), "vit-max": lambda: ToyViT("max"),
          "stem-cls": lambda: ToyViT("cls", stem=True)}


def learning_curve(name: str, train, heldout, *, steps: int, every: int, lr: float = 2e-3, batch: int = 64) -> dict:
    """Held-out accuracy of model `name` every `every` steps, and its seconds per step."""
    torch.manual_seed(0)
    model, gen = MODELS[name](), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    labelled, has = torch.nonzero(train.main >= 0).flatten(), heldout.main >= 0
    curve, spent = {}, 0.0
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, peak=lr, warmup=min(50, steps // 10 + 1))
        idx = labelled[torch.randint(len(labelled), (batch,), generator=gen)]
        (pixels,) = flip(train.pixels[idx], which=torch.rand(batch, generator=gen) < 0.5)
        t = time.perf_counter()
        loss = F.cross_entropy(model(pixels), train.main[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.perf_counter() - t
        if step % every == 0 or step == steps:
            model.eval()
            with torch.inference_mode():
                hits = torch.cat([model(p).argmax(1) for p in heldout.pixels.split(200)]) == heldout.main
            model.train()
            curve[step] = float(hits[has].float().mean())
    return {"curve": curve, "s_per_step": spent / steps}


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--scenes", type=int, help="train scenes (seed 0); each gives its centred square and a crop")
    p.add_argument("--heldout", type=int, help="held-out scenes (seed 1), scored on view 0")
    p.add_argument("--steps", type=int)
    p.add_argument("--every", type=int, help="score the held-out views every this many steps")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="which to train (default: all)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    torch.set_num_threads(1)
    train = make_views(make_scenes(args.scenes, seed=0), SIDE, crops=1, seed=0)
    heldout = make_views(make_scenes(args.heldout, seed=1), SIDE)
    rows = []
    for name in args.models:
        got = learning_curve(name, train, heldout, steps=args.steps, every=args.every)
        rows.append({"model": name, **{f"acc@{s}": a for s, a in got["curve"].items()},
                     "ms_per_step": 1000 * got["s_per_step"]})
        print(f"{name}: {got['curve']}", flush=True)
    columns = [("model", "model", "s")] + [(k, k, ".3f") for k in rows[0] if k.startswith("acc@")] + \
              [("ms_per_step", "ms/step", ".0f")]
    payload = common.meta(torch.device("cpu"), __file__, args.argv, threads=1)
    return common.report(payload, rows, columns, args.json_out, title="Held-out shape accuracy against steps (batch 64)")


if __name__ == "__main__":
    main()
