"""A generated sample dataset: labelled scenes with per-pixel masks, plus the bad files users have.

Each image shows one shape of its class (circle, square, triangle, star) in a random colour, size
and place on a textured background; its mask PNG holds class index + 1 on the shape, 0 elsewhere.

```
<dir>/images/<class>/<k>.jpg      <dir>/masks/<class>/<k>.png      <dir>/images/*.{jpg,png}  (bad files, unlabelled, with bad=True)
```
"""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import RadioDistillError

CLASSES = ("circle", "square", "star", "triangle")


def make_sample_dataset(root: str | Path, *, images: int = 64, size: int = 96, seed: int = 0,
                        bad: bool = False, huge: bool = False) -> Path:
    """Write the dataset under `root`; returns the image folder to pass to `radio-cache build`."""
    for option, value in (("--images", images), ("--size", size)):
        if value < 1:
            raise RadioDistillError(f"{option} must be >= 1, got {value}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(images):
        cls = CLASSES[k % len(CLASSES)]
        image, mask = _scene(cls, size, rng)
        for sub, ext, im in (("images", "jpg", image), ("masks", "png", mask)):
            path = root / sub / cls / f"{k:05d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path, quality=90) if ext == "jpg" else im.save(path)
    if bad:
        write_bad_files(root / "images", huge=huge)
    return root / "images"


def _scene(cls: str, size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    yy, xx = np.mgrid[0:size, 0:size]
    freq, phase = rng.uniform(0.05, 0.3), rng.uniform(0, 2 * math.pi)
    base = rng.uniform(40, 200, size=3)
    texture = np.sin(freq * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) + phase)
    bg = np.clip(base + 40 * texture[..., None] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    image, mask = Image.fromarray(bg), Image.new("L", (size, size), 0)
    r = rng.uniform(0.18, 0.35) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    for canvas, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), CLASSES.index(cls) + 1)):
        if cls == "circle":
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif cls == "square":
            canvas.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            n, inner = (3, 1.0) if cls == "triangle" else (5, 0.45)
            points = []
            for i in range(2 * n if cls == "star" else n):
                rad = r * (inner if cls == "star" and i % 2 else 1.0)
                a = -math.pi / 2 + i * math.pi / (n if cls == "star" else n / 2)
                points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
            canvas.polygon(points, fill=fill)
    return image, mask


BAD_FILES = {
    "empty.jpg": "empty file (0 bytes)",
    "truncated.jpg": "truncated image",
    "text.jpg": "not an image (unidentified format)",
}


def write_bad_files(folder: Path, *, huge: bool = False) -> dict[str, str]:
    """Write the odd files real datasets hold. Returns {file name: expected unreadable reason}, for
    those that must be refused; the others must load as RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    (folder / "empty.jpg").write_bytes(b"")
    buf = folder / "truncated.jpg"
    rgb.save(buf, quality=90)
    buf.write_bytes(buf.read_bytes()[:400])
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16)).save(folder / "grey16.png")
    rgb.convert("L").save(folder / "grey.jpg")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    if huge:
        Image.new("RGB", (12000, 9000), (20, 120, 200)).save(folder / "huge.jpg", quality=90)
    return dict(BAD_FILES)
