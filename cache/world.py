"""A generated world with known answers: shapes x colours x sizes on textured backgrounds.

Each scene holds 1-3 objects (circle, cross, square, star, triangle), each in one of six colours and
three sizes, rotated, shaded and casting a soft shadow, on a grass, sand, water, stone or wood
texture; later objects may partly hide earlier ones. Scenes come at odd sizes (not only squares).
The main object is the largest visible one; it lies inside the image's centred square (the view
every teacher sees first), and its shape is the scene's label. Every scene carries its caption
("a large red star and a small blue circle on grass"), a class mask (shape index + 1 on each
object, 0 background) and an instance mask (object number + 1 in drawing order, 0 background).

On disk (`radio-cache sample OUT --scenes`), the layout of `sample_data.py` plus instances and captions:

```
<dir>/images/<shape>/<k>.jpg   <dir>/masks/<shape>/<k>.png   <dir>/instances/<shape>/<k>.png   <dir>/scenes.jsonl
```

Letters: H, W scene height and width.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "cross", "square", "star", "triangle")  # sorted: folder labels and mask values agree
COLOURS = {"red": (210, 40, 35), "yellow": (235, 205, 40), "green": (40, 170, 60), "blue": (40, 80, 215),
           "purple": (140, 50, 170), "white": (238, 238, 232)}
SIZES = {"small": (0.11, 0.145), "medium": (0.165, 0.21), "large": (0.235, 0.29)}  # radius / short side
BACKGROUNDS = ("grass", "sand", "water", "stone", "wood")
SIDES = (96, 176)  # scene width and height are drawn from this range


@dataclass
class Thing:
    """One object of a scene; `area` is its visible pixel count after occlusion."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    angle: float
    area: int = 0


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    classes: np.ndarray  # (H, W) uint8: shape index + 1, 0 background
    instances: np.ndarray  # (H, W) uint8: object number + 1, 0 background
    things: list[Thing]
    background: str
    main: int  # index in `things` of the largest visible object
    caption: str = field(default="")

    @property
    def label(self) -> int:
        """The main object's shape index."""
        return SHAPES.index(self.things[self.main].shape)


def make_scene(rng: np.random.Generator, *, size: tuple[int, int] | None = None, objects: int | None = None) -> Scene:
    """One random scene.

    Args:
        rng: the only source of randomness.
        size: (W, H); default drawn from `SIDES`.
        objects: how many objects (1-3); default 1 (45 %), 2 (35 %) or 3 (20 %).
    """
    W, H = size or tuple(int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
    n = objects or int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    background = str(rng.choice(BACKGROUNDS))
    image = _background(background, W, H, rng)
    short = min(W, H)
    x0, y0 = (W - short) / 2, (H - short) / 2  # the centred square
    # the main object first (largest size class), the others strictly smaller, anywhere
    main_size = str(rng.choice(list(SIZES))) if n == 1 else str(rng.choice(["medium", "large"]))
    things = [_thing(rng, main_size, short, (x0, y0, x0 + short, y0 + short), inside=True)]
    smaller = list(SIZES)[:list(SIZES).index(main_size)]
    for _ in range(n - 1):
        for _try in range(20):
            t = _thing(rng, str(rng.choice(smaller)), short, (0, 0, W, H), inside=False)
            if all(math.dist(t.centre, o.centre) > 0.75 * (t.radius + o.radius) for o in things):
                things.append(t)  # may overlap an earlier object, never hide most of it
                break
    classes = np.zeros((H, W), np.uint8)
    instances = np.zeros((H, W), np.uint8)
    for k, t in enumerate(things):
        alpha = _alpha(t, W, H)  # (H, W) float coverage
        image = _draw(image, t, alpha, rng)
        inside = alpha >= 0.5
        classes[inside], instances[inside] = SHAPES.index(t.shape) + 1, k + 1
    for k, t in enumerate(things):
        t.area = int((instances == k + 1).sum())
    main = max(range(len(things)), key=lambda k: things[k].area)
    scene = Scene(image=image, classes=classes, instances=instances, things=things, background=background, main=main)
    scene.caption = caption(scene, rng)
    return scene


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """'a large red star and a small blue circle on grass': the main object first, then the others by
    size; a non-main object's size is said half the time."""
    order = [scene.main] + sorted((k for k in range(len(scene.things)) if k != scene.main),
                                  key=lambda k: -scene.things[k].area)
    parts = []
    for k in order:
        t = scene.things[k]
        words = ([t.size] if k == scene.main or rng.random() < 0.5 else []) + [t.colour, t.shape]
        parts.append("a " + " ".join(words))
    return " and ".join(parts) + f" on {scene.background}"


def _thing(rng, size: str, short: int, region, *, inside: bool) -> Thing:
    lo, hi = SIZES[size]
    r = float(rng.uniform(lo, hi)) * short
    x0, y0, x1, y1 = region
    pad = r * 1.05 if inside else 0.0  # the main object lies wholly in the centred square
    cx, cy = rng.uniform(x0 + pad, x1 - pad), rng.uniform(y0 + pad, y1 - pad)
    return Thing(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))), size=size,
                 centre=(float(cx), float(cy)), radius=r, angle=float(rng.uniform(0, 2 * math.pi)))


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape (None for a circle), rotated by `angle`; squares and crosses fill about as
    much as a circle of radius r."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + i * math.pi / 2 for i in range(4))]
        pts = [(x * 0.95, y * 0.95) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + i * 2 * math.pi / 3 for i in range(3))]
        pts = [(x * 1.1, y * 1.1) for x, y in pts]
    elif shape == "star":
        pts = [((1.1 if i % 2 == 0 else 0.45) * math.cos(a), (1.1 if i % 2 == 0 else 0.45) * math.sin(a))
               for i, a in enumerate(-math.pi / 2 + i * math.pi / 5 for i in range(10))]
    elif shape == "cross":
        a, b = 0.95, 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        raise ValueError(f"unknown shape '{shape}'; available: {', '.join(SHAPES)}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _alpha(t: Thing, W: int, H: int, ss: int = 2) -> np.ndarray:
    """(H, W) coverage in [0, 1] of a thing, drawn at `ss` x supersampling."""
    canvas = Image.new("L", (W * ss, H * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = t.centre[0] * ss, t.centre[1] * ss, t.radius * ss
    pts = outline(t.shape, cx, cy, r, t.angle)
    if pts is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(pts, fill=255)
    return np.asarray(canvas.resize((W, H), Image.Resampling.BOX), dtype=np.float32) / 255


def _draw(image: np.ndarray, t: Thing, alpha: np.ndarray, rng) -> np.ndarray:
    """Composite a shaded, slightly textured object with a soft shadow onto `image`."""
    H, W = alpha.shape
    dx, dy = (int(round(v)) for v in rng.uniform(0.04, 0.1, 2) * t.radius * 2)
    shadow = np.zeros_like(alpha)
    shadow[dy:, dx:] = alpha[:H - dy, :W - dx]
    shadow = np.asarray(Image.fromarray((shadow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2)),
                        np.float32)[..., None] / 255
    out = image.astype(np.float32) * (1 - 0.45 * shadow)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    light = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - t.centre[0]) * math.cos(light) + (yy - t.centre[1]) * math.sin(light)) / max(t.radius, 1)
    base = np.asarray(COLOURS[t.colour], np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 10, 3)
    shade = 1 + 0.18 * np.clip(ramp, -1, 1)[..., None] + rng.normal(0, 0.03, (H, W, 1))
    colour = np.clip(base * shade, 0, 255)
    a = alpha[..., None]
    return np.clip(out * (1 - a) + colour * a, 0, 255).astype(np.uint8)


def _noise(W: int, H: int, rng, cells: float | tuple[float, float]) -> np.ndarray:
    """(H, W) smooth value noise in about [-1, 1] with features `cells` pixels wide (or (wide, tall))."""
    cw, ch = cells if isinstance(cells, tuple) else (cells, cells)
    gw, gh = max(2, int(W / cw) + 2), max(2, int(H / ch) + 2)
    grid = Image.fromarray(rng.uniform(0, 255, (gh, gw)).astype(np.uint8))
    return np.asarray(grid.resize((W, H), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1


def _background(kind: str, W: int, H: int, rng) -> np.ndarray:
    """(H, W, 3) uint8 texture of a background kind."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    fine = rng.normal(0, 1, (H, W)).astype(np.float32)
    if kind == "grass":  # blades: noise stretched upright
        base, tex, var = (70, 140, 50), 0.4 * _noise(W, H, rng, (2, 9)) + 0.4 * _noise(W, H, rng, 24) + 0.2 * fine, (30, 45, 20)
    elif kind == "sand":
        base, tex, var = (205, 180, 130), 0.6 * _noise(W, H, rng, 30) + 0.4 * fine, (18, 16, 14)
    elif kind == "water":
        phase, k = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.35)
        tex = np.sin(k * yy + 2 * _noise(W, H, rng, 20) + phase) * 0.7 + 0.3 * fine
        base, var = (50, 110, 170), (18, 25, 30)
    elif kind == "stone":
        base, tex, var = (125, 125, 120), 0.7 * _noise(W, H, rng, 12) + 0.3 * fine, (35, 35, 33)
    elif kind == "wood":
        k = rng.uniform(0.2, 0.5)
        tex = np.sin(k * (xx + 6 * _noise(W, H, rng, 40))) * 0.6 + 0.4 * _noise(W, H, rng, 6)
        base, var = (140, 95, 55), (30, 20, 14)
    else:
        raise ValueError(f"unknown background '{kind}'; available: {', '.join(BACKGROUNDS)}")
    tint = rng.normal(0, 12, 3)
    img = np.asarray(base, np.float32) + tint + tex[..., None] * np.asarray(var, np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scenes(n: int, *, seed: int, size: tuple[int, int] | None = None) -> list[Scene]:
    """`n` scenes from one seed (train and held-out sets come from different seeds)."""
    rng = np.random.default_rng([seed, 20])
    return [make_scene(rng, size=size) for _ in range(n)]


def write_scenes(root: str | Path, *, images: int = 64, seed: int = 0, size: tuple[int, int] | None = None) -> Path:
    """Write `images` scenes (of `size` (W, H), default drawn from `SIDES`) under `root` (layout in the module
    docstring); returns the image folder."""
    root = Path(root)
    rows = []
    for k, scene in enumerate(make_scenes(images, seed=seed, size=size)):
        name = SHAPES[scene.label]
        sample = f"{name}/{k:05d}"
        for sub, ext, arr in (("images", "jpg", scene.image), ("masks", "png", scene.classes),
                              ("instances", "png", scene.instances)):
            path = root / sub / f"{sample}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, **({"quality": 92} if ext == "jpg" else {}))
        rows.append({"id": f"{sample}.jpg", "label": name, "caption": scene.caption, "background": scene.background,
                     "size": [int(scene.image.shape[1]), int(scene.image.shape[0])], "main": scene.main,
                     "objects": [asdict(t) for t in scene.things]})
    (root / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "images"
