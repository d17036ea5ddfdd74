"""Views: the image regions teachers (and later the student) see.

View 0 is the largest centred square; views 1..V-1 are random-resized-crop boxes drawn from a
seed derived from (cache seed, sample id, view index), so any process can recompute them.
Boxes are (x0, y0, x1, y1) floats in source-image pixels. Letters: V views, R output side.
"""

import math
import zlib

import numpy as np
from PIL import Image

CROP_SCALE = (0.25, 1.0)  # fraction of the image area
CROP_RATIO = (3 / 4, 4 / 3)


def view_boxes(width: int, height: int, *, views: int, seed: int, sample_id: str) -> np.ndarray:
    """Boxes of every view of one image.

    Returns:
        (V, 4) float32 boxes in source pixels.
    """
    side = min(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    boxes = [(x0, y0, x0 + side, y0 + side)]
    for view in range(1, views):
        rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode()), view])
        boxes.append(_random_resized_crop(width, height, rng))
    return np.asarray(boxes, dtype=np.float32)


def _random_resized_crop(width: int, height: int, rng: np.random.Generator) -> tuple:
    """torchvision's RandomResizedCrop box sampling, on float coordinates and a private RNG."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    side = min(width, height)  # fall back to the centre square, as torchvision does
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def crop_resize(image: Image.Image, box: np.ndarray, resolution: int, *,
                span: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Crop `box` and resize it to (R, R) with antialiased bicubic resampling.

    Args:
        image: RGB image, possibly decoded at reduced size (see `span`).
        box: (4,) box in source pixels.
        resolution: output side R.
        span: (x0, y0, x1, y1) the source region the image covers (`load_rgb` gives it); None: the
            image is the source.

    Returns:
        (R, R, 3) uint8 pixels.
    """
    w, h = image.size
    x0, y0, x1, y1 = (float(c) for c in box)
    if span is not None:
        sx, sy = w / (span[2] - span[0]), h / (span[3] - span[1])
        x0, y0, x1, y1 = (x0 - span[0]) * sx, (y0 - span[1]) * sy, (x1 - span[0]) * sx, (y1 - span[1]) * sy
    # a box on the source's edge may land a rounding error past the decoded edge, which PIL refuses
    region = (x0, y0, min(x1, w), min(y1, h))
    out = image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=region, reducing_gap=3.0)
    return np.array(out)  # writable, so torch.from_numpy takes it without a copy warning
