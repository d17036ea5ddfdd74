"""SAM's mask IoU through a coarser grid: the ceiling of a student whose SAM map is resized up to SAM's grid.

The trained toy SAM (128 px, 16 x 16 embedding) scores point-prompt masks on held-out generated scenes from its
own embedding, and from that embedding shrunk to a student's coarser grid (antialiased, as training shrinks a
finer target) and resized back to 16 x 16 the way the SAM drop-in resizes a student's map (bilinear; nearest for
comparison). A student of stride 16 at 128 px has 8 x 8 tokens: however well it learns, a map drawn at 8 x 8 and
resized scores at most the 8 x 8 row; `radio-train --upsample sam=2` lets its head draw the 16 x 16 map itself.

    python bench/sam_grid.py --json sam_grid.json     # 200 held-out scenes (seed 1)
    python bench/sam_grid.py --quick                  # 20 scenes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import common
from radio_distill.cache.teachers import build_teacher, toy_teachers
from radio_distill.cache.toy.data import make_views, resize_mask
from radio_distill.cache.toy.score import features
from radio_distill.cache.world import make_scenes
from radio_distill.evaluate.sam import object_points, point_prompt_iou

FULL = dict(scenes=200)
QUICK = dict(scenes=20)
GRIDS = ((16, "bilinear"), (12, "bilinear"), (8, "bilinear"), (8, "nearest"))


def through_grid(embedding: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """(N, C, g, g) -> shrunk to (grid, grid), antialiased, then resized back to (g, g) by `mode`."""
    g = embedding.shape[-1]
    if grid == g:
        return embedding
    small = F.interpolate(embedding, size=(grid, grid), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(g, g), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def main(argv=None) -> dict:
    p = common.parser(__doc__)
    p.add_argument("--scenes", type=int, help="held-out generated scenes (seed 1, the toy teachers' held-out seed)")
    args = common.parse(p, argv, full=FULL, quick=QUICK)
    sam = build_teacher(next(s for s in toy_teachers() if s.family == "sam"))
    scenes = make_scenes(args.scenes, seed=1)
    views = make_views(scenes, sam.resolution)
    _, spatial = features(sam, views.pixels)  # (N, g, g, C)
    embedding = spatial.permute(0, 3, 1, 2)  # (N, C, g, g)
    natives = []
    for k, box in zip(views.scene, views.box):
        side = int(round(float(box[2] - box[0])))
        natives.append(torch.from_numpy(resize_mask(scenes[k].instances, box, (side, side))))
    points = [object_points(views.instances[n], natives[n]) for n in range(len(natives))]
    rows = []
    for grid, mode in GRIDS:
        shown = through_grid(embedding, grid, mode)
        ious = torch.cat([point_prompt_iou(sam.model, shown[n], views.instances[n], natives[n], points=points[n])
                          for n in range(len(natives))])
        rows.append({"grid": f"{grid}x{grid}", "resize": "none" if grid == embedding.shape[-1] else mode,
                     "iou": float(ious.mean()), "objects": len(ious)})
    for row in rows:
        row["of_own"] = row["iou"] / rows[0]["iou"]
    columns = [("grid", "map drawn at", ""), ("resize", "resized to 16x16 by", ""), ("iou", "mask IoU", ".3f"),
               ("of_own", "x own", ".2f"), ("objects", "objects", "d")]
    payload = common.meta(torch.device("cpu"), __file__, args.argv, scenes=args.scenes)
    return common.report(payload, rows, columns, args.json_out,
                         title="Toy SAM's point-prompt mask IoU with its embedding through a coarser grid")


if __name__ == "__main__":
    main()
