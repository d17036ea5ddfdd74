"""Reduced (DCT-scaled) JPEG decodes: at every scale, odd size and EXIF orientation they give the true
source size and the crops of a full decode — in `load_rgb`, the build, the training reader and eval.

Letters: W, H source size after EXIF orientation; k DCT scale denominator; R crop side.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import ExifTags, Image

from radio_distill.store import layout as L
from radio_distill.cache.build import build_cache
from radio_distill.cache.config import load_cache_config
from radio_distill.store.dataset import load_rgb
from radio_distill.store.views import crop_resize, view_boxes
from radio_distill.evaluate.features import view_image
from radio_distill.evaluate.report import PICTURE_SIDE
from radio_distill.store.reader import CacheReader

SIZES = [(415, 258), (999, 999), (1001, 667), (451, 450), (257, 1023)]  # as stored, before orientation
MAX_DIFF = 1.5  # mean abs difference (0..255) between a crop of a reduced decode and of the full decode


def _pixels(width: int, height: int) -> np.ndarray:
    """A smooth picture that changes under every flip and turn: (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    wave = 128 + 100 * np.sin(2 * np.pi * (xx + 2 * yy) / 151)
    return np.stack([255 * xx / (width - 1), 255 * yy / (height - 1), wave], -1).astype(np.uint8)


def _save(path: Path, size: tuple[int, int], orientation: int) -> Path:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(_pixels(*size)).save(path, quality=95, exif=exif)
    return path


def _oriented(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return size[::-1] if orientation >= 5 else size


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b).mean())


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("odd")
    return {(size, o): _save(folder / f"{size[0]}x{size[1]}_o{o}.jpg", size, o) for size in SIZES for o in range(1, 9)}


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_reduced_decode_has_the_true_size_and_the_crops_of_the_full_decode(jpegs, size, orientation, k):
    width, height = _oriented(size, orientation)
    side = min(size) // (2 * k)  # the largest R whose decode is reduced by k
    full = load_rgb(jpegs[size, orientation], min_side=min(size))
    reduced = load_rgb(jpegs[size, orientation], min_side=side)
    assert full.image.size == full.size == reduced.size == (width, height) and full.span == (0, 0, width, height)
    assert reduced.image.size == (math.ceil(width / k), math.ceil(height / k))  # decoded at 1/k
    x0, y0, x1, y1 = reduced.span
    assert (x1 - x0, y1 - y0) == (k * reduced.image.width, k * reduced.image.height)
    assert x0 <= 0 <= x0 + k - 1 and y0 <= 0 <= y0 + k - 1 and x1 >= width and y1 >= height
    for box in view_boxes(width, height, views=8, seed=k, sample_id=str(size)):
        crop = crop_resize(reduced.image, box, side, span=reduced.span)
        assert _diff(crop, crop_resize(full.image, box, side)) < MAX_DIFF, box


ODD = {"a/415x258.jpg": ((415, 258), 1), "a/999x999.jpg": ((999, 999), 3), "b/1001x667.jpg": ((1001, 667), 6),
       "b/451x450.jpg": ((451, 450), 1), "b/450x451.jpg": ((450, 451), 6), "c/257x1023.jpg": ((257, 1023), 8)}


@pytest.fixture(scope="module")
def odd_store(ray_session, tmp_path_factory) -> Path:
    """A store of ODD by the tiny teachers (largest side 112: the build decodes the >= 450 px images
    reduced), with view pixels stored at 32 px."""
    root = tmp_path_factory.mktemp("odd_store")
    for name, (size, orientation) in ODD.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        _save(root / "images" / name, size, orientation)
    cfg = load_cache_config(data=root / "images", out=root / "cache.zarr", teachers="tiny", views=3, shard_size=3,
                            workers=1, pixels=32)
    report = build_cache(cfg, progress=False)
    assert report["complete"], report
    return root / "cache.zarr"


def _full_crop(store: Path, index: int, view: int, side: int) -> np.ndarray:
    root = zarr.open_group(store, mode="r")
    image = load_rgb(Path(root.attrs["dataset"]["root"]) / str(root[L.IDS][index]), min_side=10_000).image
    return crop_resize(image, root[L.BOXES][index, view], side)


def test_build_stores_the_boxes_of_the_true_size_and_their_pixels(odd_store):
    root = zarr.open_group(odd_store, mode="r")
    ids = [str(i) for i in root[L.IDS][:]]
    assert sorted(ids) == sorted(ODD) and (root[L.STATUS][:] == L.OK).all()
    for k, sample_id in enumerate(ids):
        size = _oriented(*ODD[sample_id])
        np.testing.assert_array_equal(root[L.BOXES][k], view_boxes(*size, views=3, seed=0, sample_id=sample_id))
        for v in range(3):
            assert _diff(root[L.PIXELS][k, v], _full_crop(odd_store, k, v, 32)) < MAX_DIFF, (sample_id, v)


@pytest.mark.parametrize("resolution", [16, 64])
def test_training_reader_crops_reduced_decodes(odd_store, resolution):
    reader = CacheReader(odd_store)
    dataset = reader.dataset(resolution=resolution)
    for i in range(reader.num_samples):
        for v in range(3):
            assert _diff(dataset.crop(i, v), _full_crop(odd_store, i, v, resolution)) < MAX_DIFF


def test_eval_pictures_crop_reduced_decodes(odd_store):
    reader = CacheReader(odd_store)
    for i in range(reader.num_samples):
        assert _diff(view_image(reader, i, PICTURE_SIDE), _full_crop(odd_store, i, 0, PICTURE_SIDE)) < MAX_DIFF
