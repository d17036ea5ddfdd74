"""Each toy teacher's own score on its own task, from a loaded `Teacher` (what `build_teacher` gives),
computed with the metric functions `radio-eval` uses:

- CLIP: zero-shot top-1 by shape name, its summary against `radio-cache text`'s class embeddings
  (`class_embeddings` over `DEFAULT_TEMPLATES`).
- DINOv2: weighted kNN top-1 (`knn_top1`) of its summary, and a dense linear probe's mIoU
  (`probe_miou`) from its patch tokens against class masks resized to its grid.
- SAM: point-prompt mask IoU (`evaluate.sam.point_prompt_iou`, which `radio-eval` uses too): one
  positive point per object (its deepest pixel, farthest from the edge) through the prompt encoder
  and mask decoder (single-mask output) on its own image embeddings, the mask upsampled by
  `Sam.postprocess_masks` to the view's size in scene pixels and compared with the instance mask
  there. Objects showing fewer than `MIN_PIXELS` pixels in the view are not prompted.

Every score is on view 0 (the centred square the store caches first) of the given scenes.

Letters: N views, R side, h, w a teacher grid, C channels, D summary width, K objects in a view.
"""

from __future__ import annotations

import numpy as np
import torch

from ...evaluate.dense import probe_miou
from ...evaluate.metrics import knn_top1, zero_shot_top1
from ...evaluate.sam import MIN_PIXELS, point_prompt_iou
from ...ops import normalise
from ..text import DEFAULT_TEMPLATES, class_embeddings
from ..world import COLOURS, SHAPES, Scene
from .data import Views, make_views, resize_mask


@torch.inference_mode()
def features(teacher, pixels: torch.Tensor, *, batch: int = 128) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A teacher's (summary (N, D) | None, spatial (N, h, w, C)) on (N, 3, R, R) uint8 pixels at its side."""
    summaries, spatials = [], []
    for start in range(0, len(pixels), batch):
        summary, spatial = teacher(normalise(pixels[start:start + batch], teacher.mean, teacher.std))
        summaries.append(summary)
        spatials.append(spatial)
    return (None if summaries[0] is None else torch.cat(summaries)), torch.cat(spatials)


NAMES = {"shape": SHAPES, "colour": tuple(COLOURS)}  # what a scene's label can be: its main object's shape or colour


def labels_of(scenes: list[Scene], views: Views, by: str = "shape") -> np.ndarray:
    """(N,) the label of the scene of each view: its main object's shape (the scene label) or colour."""
    return np.array([NAMES[by].index(getattr(scenes[k].things[scenes[k].main], by)) for k in views.scene])


def clip_zero_shot(teacher, scenes: list[Scene], *, by: str = "shape") -> float:
    """Zero-shot top-1 by shape (or colour) name on view 0 of `scenes`."""
    import open_clip

    views = make_views(scenes, teacher.resolution)
    text = class_embeddings(teacher.model, open_clip.get_tokenizer(teacher.spec.model), list(NAMES[by]),
                            DEFAULT_TEMPLATES, device=torch.device("cpu"))
    summary, _ = features(teacher, views.pixels)
    return zero_shot_top1(summary, text, labels_of(scenes, views, by))


def dinov2_scores(teacher, bank: list[Scene], probe: list[Scene], scenes: list[Scene], *, probe_steps: int = 300,
                  by: str = "shape") -> dict:
    """{'knn': kNN top-1 by shape (or colour) of `scenes` against a bank of `bank`'s summaries,
    'dense_miou': a linear probe trained on `probe`'s patch tokens, scored on `scenes`'} (view 0 everywhere)."""
    bank_views, probe_views, views = (make_views(s, teacher.resolution) for s in (bank, probe, scenes))
    bank_summary, _ = features(teacher, bank_views.pixels)
    summary, spatial = features(teacher, views.pixels)
    knn = knn_top1(bank_summary, labels_of(bank, bank_views, by), summary, labels_of(scenes, views, by),
                   num_classes=len(NAMES[by]))
    _, probe_spatial = features(teacher, probe_views.pixels)
    h, w = spatial.shape[1:3]

    def grids(s: list[Scene], v: Views) -> np.ndarray:
        return np.stack([resize_mask(s[k].classes, box, (w, h)) for k, box in zip(v.scene, v.box)])

    miou = probe_miou(probe_spatial.numpy(), grids(probe, probe_views), spatial.numpy(), grids(scenes, views),
                      num_classes=len(SHAPES) + 1, steps=probe_steps)
    return {"knn": knn, "dense_miou": miou}


@torch.inference_mode()
def sam_point_iou(teacher, scenes: list[Scene], *, min_pixels: int = MIN_PIXELS) -> dict:
    """{'iou': mean point-prompt mask IoU over objects, 'objects': how many} on view 0 of `scenes`
    (`evaluate.sam.point_prompt_iou` on the teacher's own embeddings)."""
    sam, R = teacher.model, teacher.resolution
    views = make_views(scenes, R)
    _, spatial = features(teacher, views.pixels)  # (N, g, g, C): the store's SAM target
    ious = []
    for n, (k, box) in enumerate(zip(views.scene, views.box)):
        side = int(round(float(box[2] - box[0])))
        native = torch.from_numpy(resize_mask(scenes[k].instances, box, (side, side)))  # (side, side)
        iou = point_prompt_iou(sam, spatial[n].permute(2, 0, 1), views.instances[n], native, min_pixels=min_pixels)
        if len(iou):
            ious.append(iou)
    ious = torch.cat(ious)
    return {"iou": float(ious.mean()), "objects": len(ious)}
