"""Image datasets: a folder or a list file becomes a manifest of stable sample ids; images load as RGB.

Sample ids are normalised posix paths relative to the dataset root, each image once.

A folder (the root) is walked recursively; labels come from first-level subfolders when present.
Ids are sorted, so the order is stable across machines. Directory symlinks are followed, wherever
they point (a folder of links to shared storage is a dataset), under their path inside the root; a
folder reached twice (a symlink loop, or two links to one folder) is walked once, at its first path
in the walk (depth first, names sorted).

A list file holds one path per line, or CSV `path,label`, in the file's order (UTF-8, a BOM
ignored); its folder is the root. Labels that are all integers are those integers, else names
(`text_labels`); a line with a label but no path is refused. Each path is normalised (`./a.jpg`,
`sub/../a.jpg` -> `a.jpg`); a path outside the root after normalisation (`../x.jpg`, or an absolute
path not under the list's folder) is refused, as is an image listed twice under any spelling. The
check is on the path as written: a symlink inside the root is followed, as in folders.

Every sample's name must be UTF-8 (`check_names`), in any kind of dataset.
"""

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

MAX_CLASSES = 100_000  # integer labels above this are refused: ImageNet-21k has 21,841 classes
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
INTEGER = re.compile(r"-?[0-9]+")  # a label text that is a number
SURROGATES = re.compile("[\ud800-\udfff]")  # how Python holds the bytes of a file name that are not UTF-8
MAX_PIXELS = 1 << 28  # 268 MP: bigger images are refused (Pillow's own bomb check is replaced by this)
MAX_DECODED = 1 << 31  # bytes one image may take while `load_rgb` decodes it (`decoded_bytes`); more: refused
HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # modes `_to_rgb` scales to 8 bits
Image.MAX_IMAGE_PIXELS = None
ORIENTATIONS = {  # EXIF orientation -> (axes swapped, x flipped, y flipped) in `ImageOps.exif_transpose`'s output
    2: (False, True, False), 3: (False, True, True), 4: (False, False, True), 5: (True, False, False),
    6: (True, True, False), 7: (True, True, True), 8: (True, False, True)}


@dataclass(frozen=True)
class Manifest:
    """The samples of a dataset, in their stable order."""

    root: Path
    ids: tuple[str, ...]
    labels: tuple[int, ...]  # -1 where unlabelled
    classes: tuple[str, ...]
    kind: str = "folder"  # folder | list | tar | parquet (the last two: `sources.py`)
    files: tuple[str, ...] = ()  # tar, parquet: the files, relative to root, that `locations` index
    column: str | None = None  # parquet: the image column
    # tar, parquet: (N, 3) int64 where each image is (`sources.py`); an array and a dict: not compared or hashed
    locations: np.ndarray | None = field(default=None, compare=False)
    reasons: dict[int, str] = field(default_factory=dict, compare=False)  # samples known unreadable from the scan: why
    # tar planned unlisted (`sources.py`): rows per tar; ids, labels, locations are `Generated`, found by the worker
    tar_samples: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of ids, labels and classes (and, for tars and Parquet, of where each image is): a store
        built from other samples is another store. Unlisted tars: of their names and rows per tar."""
        if self.tar_samples is not None:
            return hashlib.sha256(json.dumps(["unlisted", self.files, self.tar_samples]).encode()).hexdigest()
        digest = hashlib.sha256(json.dumps([self.ids, self.labels, self.classes]).encode())
        if self.locations is not None:
            digest.update(json.dumps(self.files).encode())
            digest.update(np.ascontiguousarray(self.locations, dtype="<i8").tobytes())
        return digest.hexdigest()

    def source(self) -> dict:
        """Where the images are and how they are read, as the store records it (`sources.Images` reads it)."""
        packed = {"files": list(self.files), "column": self.column} if self.locations is not None else {}
        if self.tar_samples is not None:
            packed["tar_samples"] = self.tar_samples
        return {"root": str(self.root), "kind": self.kind, **packed}


class Generated:
    """A sequence of n rows made from their row numbers when sliced (`make(rows) -> values`), as a Manifest's
    ids, labels or locations: a manifest of 10^8 samples that is never held whole."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, part):
        if isinstance(part, slice):
            return self.make(np.arange(*part.indices(self.n)))
        if np.ndim(part):
            return self.make(np.asarray(part, np.int64))
        if not -self.n <= part < self.n:
            raise IndexError(part)
        return self.make(np.array([part % self.n], np.int64))[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)


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
    check_names(manifest)
    return manifest


def check_names(manifest: Manifest) -> None:
    """Refuse a sample whose name is not UTF-8 (Python holds its odd bytes as surrogates).

    The store keeps ids as UTF-8 text and finds each image again by its id, so such a name can be
    neither written nor kept as an unreadable sample under another spelling: the fix is a rename,
    before anything is created (it was a UnicodeEncodeError once Ray had started).

    Raises:
        DatasetError: naming the first such file (a tar member: its tar and key) by its bytes.
    """
    try:
        "\n".join(manifest.ids).encode()  # one pass: a million ids in milliseconds
    except UnicodeEncodeError:
        bad = next(i for i in manifest.ids if SURROGATES.search(i))
        name = os.fsencode(manifest.root / bad)
        raise DatasetError(f"dataset '{manifest.root}': the name {name!r} is not UTF-8, and the store keeps sample ids "
                           "as UTF-8 text; rename it (e.g. `convmv -f latin1 -t utf8`)") from None


def _scan_folder(root: Path) -> Manifest:
    ids = sorted(_walk(str(root)))
    classes = sorted({i.split("/", 1)[0] for i in ids if "/" in i})
    index = {c: k for k, c in enumerate(classes)}
    labels = tuple(index[i.split("/", 1)[0]] if "/" in i else -1 for i in ids)
    return Manifest(root, tuple(ids), labels, tuple(classes), kind="folder")


def _walk(root: str) -> list[str]:
    """Relative posix paths of the image files under `root` (unsorted).

    `os.scandir` entries answer `is_dir()` from the directory listing (no stat, except for
    symlinks), which keeps the walk at hundreds of thousands of files per second. Folders are
    recognised by (device, inode), so a loop ends and a folder is walked once.
    """
    ids, seen, stack = [], set(), [("", root, _folder_key(os.stat(root)))]
    while stack:
        prefix, folder, key = stack.pop()
        if key in seen:
            continue
        seen.add(key)
        subfolders = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    dot = name.rfind(".")  # the suffix as `Path.suffix` has it, without its per-call cost
                    if entry.is_dir():
                        subfolders.append(entry)
                    elif dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS:
                        ids.append(prefix + name)
            subfolders.sort(key=lambda e: e.name, reverse=True)  # popped in name order
            stack.extend((f"{prefix}{e.name}/", e.path, _folder_key(e.stat())) for e in subfolders)
        except OSError as e:
            raise DatasetError(f"dataset folder '{folder}' cannot be read: {e.strerror or e}") from None
    return ids


def _folder_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _read_list(path: Path) -> Manifest:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM (as Excel writes) is not text
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r) and not r[0].startswith("#")]
    except UnicodeDecodeError:
        raise DatasetError(f"'{path}' is not a list file (not UTF-8 text); give an image folder, a list file "
                           "(path[,label] per line), uncompressed .tar shards or .parquet files") from None
    if rows and [c.strip().lower() for c in rows[0][1]][:2] == ["path", "label"]:
        rows = rows[1:]
    root = path.parent.as_posix()
    ids, names, first = [], [], {}  # first: id -> (line, path as written)
    for line, row in rows:
        if len(row) > 2:
            raise DatasetError(f"list file '{path}', line {line}: expected 'path' or 'path,label', got {row!r}")
        written = row[0].strip()
        if not written:
            raise DatasetError(f"list file '{path}', line {line}: no path in {row!r}; each line is 'path' or "
                               "'path,label'")
        sample_id = list_id(written, root)
        if sample_id is None:
            raise DatasetError(f"list file '{path}', line {line}: '{written}' is outside the list's folder '{root}'; "
                               "paths are relative to it, without '..' above it or absolute paths elsewhere")
        if sample_id in first:
            other_line, other = first[sample_id]
            raise DatasetError(f"list file '{path}': line {other_line} '{other}' and line {line} '{written}' are the "
                               f"same image '{sample_id}'; list each image once")
        first[sample_id] = (line, written)
        ids.append(sample_id)
        names.append(row[1].strip() if len(row) == 2 else "")
    labels, classes = text_labels(names, lambda k: f"list file '{path}', line {rows[k][0]}")
    return Manifest(path.parent, tuple(ids), labels, classes, kind="list")


def text_labels(names: list[str], where) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Labels and classes from label texts ('' unlabelled).

    When every text is an integer, the label is that integer (-1 unlabelled, as in tars and Parquet)
    and the classes are '0' .. the largest, so class k is label k (sorted as names, '10' came before
    '2'); `radio-cache text --classes` then names them in that order. Else each name is a class, sorted.

    Args:
        where: k -> where text k is written, for the error naming a label below -1.
    """
    given = [n for n in names if n]
    if given and all(INTEGER.fullmatch(n) for n in given):
        labels = tuple(int(n) if n else -1 for n in names)
        below = next((k for k, v in enumerate(labels) if v < -1), None)
        if below is not None:
            raise DatasetError(f"{where(below)}: label {labels[below]} is below -1 (-1: unlabelled); labels are "
                               "0, 1, ...")
        return labels, numbered_classes(max(labels), where(labels.index(max(labels))))
    classes = sorted(set(given))
    index = {c: k for k, c in enumerate(classes)}
    return tuple(index[n] if n else -1 for n in names), tuple(classes)


def numbered_classes(top: int, where: str) -> tuple[str, ...]:
    """Class names '0' .. `top` for integer labels (the store lists every class by name).

    Raises:
        DatasetError: `top` above MAX_CLASSES, naming `where` it was written: such a label is no class
            number (a 3000000 made a 56 MB zarr.json of names)."""
    if top >= MAX_CLASSES:
        raise DatasetError(f"{where}: label {top} would make {top + 1} classes; class numbers run 0, 1, ... below "
                           f"{MAX_CLASSES} (is it an id, not a class?)")
    return tuple(str(c) for c in range(top + 1))


def list_id(written: str, root: str) -> str | None:
    """The sample id of a listed path: normalised, relative to `root` (absolute posix); None outside it."""
    normal = posixpath.normpath(written)
    if posixpath.isabs(normal):
        normal = posixpath.relpath(normal, root)
    return None if normal == ".." or normal.startswith("../") else normal


class UnreadableImage(Exception):
    """An image that cannot be turned into RGB pixels; the message is the reason stored."""


class Decoded(NamedTuple):
    """An image's RGB pixels and where they lie in the source, whose pixels (after EXIF orientation)
    are the frame of view boxes."""

    image: Image.Image
    span: tuple[float, float, float, float]  # (x0, y0, x1, y1): the source region the pixels cover
    size: tuple[int, int]  # (W, H) of the source after EXIF orientation


def load_rgb(source: Path | bytes, *, min_side: int) -> Decoded:
    """Decode an image file, or an image's bytes (a tar member, a Parquet cell), as 8-bit RGB, oriented
    by its EXIF tag.

    Huge JPEGs are decoded at a reduced DCT scale 1/k (k = 2, 4 or 8) that keeps their short side
    >= 2 * `min_side`. libjpeg rounds the reduced size up, so the last decoded pixel of an axis
    reaches past the source's far edge (by less than k source pixels), and an EXIF flip moves that
    margin to the near edge: `span` records it, and `crop_resize` maps boxes through it.

    At most MAX_DECODED bytes are held (`decoded_bytes`: the pixels, after a JPEG's reduced scale, in
    their mode and as RGB): a bigger image is refused before its pixels are decoded.

    Raises:
        UnreadableImage: with the reason, for missing, empty, corrupt, truncated or oversized files.
    """
    if isinstance(source, bytes):
        if not source:
            raise UnreadableImage("empty file (0 bytes)")
        source = io.BytesIO(source)
    elif not source.is_file():
        raise UnreadableImage("missing file")
    elif source.stat().st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with Image.open(source) as im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise UnreadableImage(f"too large: {width}x{height} pixels (limit {MAX_PIXELS})")
            k = 1.0
            if im.format == "JPEG" and min(width, height) > 2 * min_side:
                f = 2 * min_side / min(width, height)
                drafted = im.draft("RGB", (max(1, int(width * f)), max(1, int(height * f))))
                k = width / drafted[1][2] if drafted else 1.0  # drafted box: (0, 0, width / k, height / k)
            need = decoded_bytes(im.size, im.mode)  # a 141 KB 16-bit PNG can hold 8000x8000 pixels
            if need > MAX_DECODED:
                raise UnreadableImage(f"too large to decode: {im.width}x{im.height} pixels of mode {im.mode} take "
                                      f"{need / 2**20:.1f} MiB (limit {MAX_DECODED / 2**20:.1f} MiB)")
            swap, flip_x, flip_y = ORIENTATIONS.get(im.getexif().get(ExifTags.Base.Orientation, 1), (False,) * 3)
            if swap:
                width, height = height, width
            image = _to_rgb(ImageOps.exif_transpose(im))  # loads the pixels
            span_w, span_h = k * image.width, k * image.height
            x0, y0 = (width - span_w if flip_x else 0.0), (height - span_h if flip_y else 0.0)
            return Decoded(image, (x0, y0, x0 + span_w, y0 + span_h), (width, height))
    except UnidentifiedImageError:
        raise UnreadableImage("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = "truncated image" if "truncated" in str(e).lower() else f"corrupt image: {e}"
        raise UnreadableImage(reason) from None


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """The most memory `load_rgb` holds for an image of `size` (W, H) decoded in Pillow `mode`: its pixels
    and their oriented copy (Pillow keeps 1, 2 or 4 bytes a pixel), the RGB result (4 bytes a pixel), and
    from a 16/32-bit mode its float32 grey (4), from alpha or a palette its RGBA composite (8). The peaks
    measured at 4000x4000 (L 6, RGB 12, RGBA 16, P 13, I;16 11, F 16 bytes a pixel, plus ~2 MB) are at or
    below it."""
    per = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    work = 4 if mode in HIGH_BIT else 8 if mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") else 0
    return size[0] * size[1] * (2 * per + 4 + work)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: 16/32-bit scaled down, alpha composited on white."""
    if im.mode in HIGH_BIT:
        a = np.array(im, dtype=np.float32)  # a writable copy, scaled in place (float64 copies took 28 B a pixel)
        if a.max() > 255:
            a /= 257.0  # exact to the 8-bit grey as float64 gives it: no 16-bit value lies near a .5 (257 is odd)
        np.clip(np.rint(a, out=a), 0, 255, out=a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    if im.mode == "P" or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")
