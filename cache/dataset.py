"""Image datasets: a folder or a list file becomes a manifest of stable sample ids; images load as RGB.

A folder is scanned recursively; labels come from first-level subfolders when present. A list
file holds one path per line, or CSV `path,label`. Sample ids are paths relative to the root,
sorted, so the order is stable across machines.
"""

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 1 << 28  # 268 MP: bigger images are refused (Pillow's own bomb check is replaced by this)
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class Manifest:
    """The samples of a dataset, in their stable order."""

    root: Path
    ids: tuple[str, ...]
    labels: tuple[int, ...]  # -1 where unlabelled
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of ids, labels and classes: a store built from other samples is another store."""
        payload = json.dumps([self.ids, self.labels, self.classes]).encode()
        return hashlib.sha256(payload).hexdigest()


def scan_dataset(source: str | Path) -> Manifest:
    """List the samples of an image folder or a list file (.txt or .csv)."""
    source = Path(source).expanduser().resolve()
    if source.is_dir():
        manifest = _scan_folder(source)
    elif source.is_file():
        manifest = _read_list(source)
    else:
        raise DatasetError(f"dataset '{source}' does not exist; pass an image folder or a list file")
    if not manifest.ids:
        raise DatasetError(f"dataset '{source}' holds no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return manifest


def _scan_folder(root: Path) -> Manifest:
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
    classes = sorted({i.split("/", 1)[0] for i in ids if "/" in i})
    index = {c: k for k, c in enumerate(classes)}
    labels = tuple(index[i.split("/", 1)[0]] if "/" in i else -1 for i in ids)
    return Manifest(root, tuple(ids), labels, tuple(classes))


def _read_list(path: Path) -> Manifest:
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and r[0].strip() and not r[0].startswith("#")]
    if rows and [c.strip().lower() for c in rows[0]][:2] == ["path", "label"]:
        rows = rows[1:]
    if any(len(r) > 2 for r in rows):
        bad = next(r for r in rows if len(r) > 2)
        raise DatasetError(f"list file '{path}': expected 'path' or 'path,label' per line, got {bad!r}")
    ids = [r[0].strip() for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"list file '{path}': path '{dup}' is listed twice")
    names = [r[1].strip() if len(r) == 2 else "" for r in rows]
    classes = sorted({n for n in names if n})
    index = {c: k for k, c in enumerate(classes)}
    labels = tuple(index[n] if n else -1 for n in names)
    return Manifest(path.parent, tuple(ids), labels, tuple(classes))


class UnreadableImage(Exception):
    """An image that cannot be turned into RGB pixels; the message is the reason stored."""


def load_rgb(path: Path, *, min_side: int) -> tuple[Image.Image, float]:
    """Decode an image as 8-bit RGB, oriented by its EXIF tag.

    Huge JPEGs are decoded at a reduced DCT scale that keeps their short side >= `min_side`.

    Returns:
        (image, scale): the RGB image and decoded size / source size.

    Raises:
        UnreadableImage: with the reason, for missing, empty, corrupt, truncated or oversized files.
    """
    if not path.is_file():
        raise UnreadableImage("missing file")
    if path.stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
            if im.format == "JPEG" and min(width, height) > 2 * min_side:
                k = 2 * min_side / min(width, height)
                im.draft("RGB", (max(1, int(width * k)), max(1, int(height * k))))
            scale = im.size[0] / width
            im = ImageOps.exif_transpose(im)  # loads the pixels
            return _to_rgb(im), scale
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "truncated image" if "truncated" in str(e).lower() else f"corrupt image: {e}"
        raise UnreadableImage(reason) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16/32-bit scaled down, alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        a = a / 257.0 if a.max() > 255 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")
