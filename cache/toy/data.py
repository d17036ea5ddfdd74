"""Scenes as tensors at a teacher's side: the centred square (the store's view 0) and random crops.

Crops are the store's own random-resized-crop boxes (`cache/views.py`), resized as the build resizes
them; masks are resized with nearest sampling, as `evaluate/dense.py` does.

Letters: N views, R side in pixels, K object kinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...store.views import crop_resize, view_boxes
from ..world import COLOURS, SHAPES, SIZES, Scene


@dataclass
class Views:
    pixels: torch.Tensor  # (N, 3, R, R) uint8
    classes: torch.Tensor  # (N, R, R) uint8: shape index + 1, 0 background
    instances: torch.Tensor  # (N, R, R) uint8: object number + 1, 0 background
    scene: np.ndarray  # (N,) index of the scene a view comes from
    box: np.ndarray  # (N, 4) the view's box in scene pixels
    main: torch.Tensor  # (N,) shape index of the largest object in the view, -1 when none shows
    colour: torch.Tensor  # (N,) colour index of that object, -1 when none
    size: torch.Tensor  # (N,) size index of that object, -1 when none
    centre: torch.Tensor  # (N, 2) its centroid (x, y) in [0, 1] of the view

    def __len__(self) -> int:
        return len(self.scene)


def resize_mask(mask: np.ndarray, box, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 label map, cropped to `box` and nearest-resized to `size` (w, h): (h, w) uint8."""
    return np.array(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST, box=tuple(float(c) for c in box)))


def make_views(scenes: list[Scene], resolution: int, *, crops: int = 0, seed: int = 0, centre: bool = True) -> Views:
    """View 0 of each scene (when `centre`) and `crops` random-resized crops of it, at `resolution`.

    The crop boxes of scene k are `view_boxes(..., seed=seed, sample_id=str(k))`: what a store built
    with that seed would cut from an image of that id.
    """
    pixels, classes, instances, index, boxes, meta = [], [], [], [], [], []
    for k, s in enumerate(scenes):
        H, W = s.classes.shape
        all_boxes = view_boxes(W, H, views=1 + crops, seed=seed, sample_id=str(k))
        image = Image.fromarray(s.image)
        for box in all_boxes[0 if centre else 1:]:
            pixels.append(crop_resize(image, box, resolution))
            cls = resize_mask(s.classes, box, (resolution, resolution))
            inst = resize_mask(s.instances, box, (resolution, resolution))
            classes.append(cls)
            instances.append(inst)
            index.append(k)
            boxes.append(box)
            meta.append(_largest(s, inst))
    main, colour, size, centre_xy = zip(*meta)
    return Views(pixels=torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous(),
                 classes=torch.from_numpy(np.stack(classes)), instances=torch.from_numpy(np.stack(instances)),
                 scene=np.asarray(index), box=np.stack(boxes), main=torch.tensor(main), colour=torch.tensor(colour),
                 size=torch.tensor(size), centre=torch.tensor(np.stack(centre_xy), dtype=torch.float32))


def _largest(scene: Scene, inst: np.ndarray) -> tuple[int, int, int, np.ndarray]:
    """(shape, colour, size, centroid) of the object with the most pixels in a view's instance map."""
    counts = np.bincount(inst.ravel(), minlength=len(scene.things) + 1)[1:]
    if counts.max(initial=0) == 0:
        return -1, -1, -1, np.full(2, 0.5, np.float32)
    k = int(counts.argmax())
    t = scene.things[k]
    ys, xs = np.nonzero(inst == k + 1)
    R = inst.shape[0]
    return (SHAPES.index(t.shape), list(COLOURS).index(t.colour), list(SIZES).index(t.size),
            np.array([xs.mean() / R, ys.mean() / R], np.float32))


def flip(pixels: torch.Tensor, *maps: torch.Tensor, which: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mirror the rows of a batch where `which` (B,) is True: pixels (B, 3, R, R) and any (B, R, R) maps."""
    out = [torch.where(which.view(-1, 1, 1, 1), pixels.flip(-1), pixels)]
    out += [torch.where(which.view(-1, 1, 1), m.flip(-1), m) for m in maps]
    return tuple(out)
