"""Views: boxes are a pure function of (seed, sample id, view), inside the image; crops resize exactly."""

import math
import zlib

import numpy as np
import pytest
from PIL import Image

from radio_distill.store.views import CROP_RATIO, CROP_SCALE, crop_resize, view_boxes


@pytest.mark.parametrize("width, height", [(96, 96), (640, 480), (300, 1000), (1, 1), (2, 1)])
def test_boxes_inside_the_image_and_view0_is_the_centred_square(width, height):
    boxes = view_boxes(width, height, views=8, seed=0, sample_id="a/b.jpg")
    assert boxes.shape == (8, 4) and boxes.dtype == np.float32
    side = min(width, height)
    np.testing.assert_allclose(boxes[0], [(width - side) / 2, (height - side) / 2, (width + side) / 2,
                                          (height + side) / 2])
    x0, y0, x1, y1 = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width + 1e-3).all() and (y1 <= height + 1e-3).all()
    assert (x1 > x0).all() and (y1 > y0).all()


def test_random_views_follow_random_resized_crop():
    boxes = view_boxes(640, 480, views=64, seed=3, sample_id="x.jpg")[1:]
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = w * h / (640 * 480)
    assert (area >= CROP_SCALE[0] - 1e-4).all() and (area <= CROP_SCALE[1] + 1e-4).all()
    ratio = w / h
    square = np.isclose(w, 480) & np.isclose(h, 480)  # torchvision's fallback after 10 misses
    assert ((ratio >= CROP_RATIO[0] - 1e-4) & (ratio <= CROP_RATIO[1] + 1e-4) | square).all()
    assert (ratio[~square] < 0.9).any() and (ratio[~square] > 1.1).any()  # tall and wide crops both
    assert len({tuple(b) for b in boxes.round(2)}) == len(boxes)


def test_random_views_are_the_first_of_ten_draws_that_fits_else_the_centre_square():
    """torchvision's RandomResizedCrop, draw by draw: up to 10 times an area fraction in CROP_SCALE and a
    log-uniform aspect ratio in CROP_RATIO; the first box that fits is placed uniformly, and after 10
    misses the view is the centre square. On a 100 x 40 image about 1 in 10 views misses 10 times."""
    width, height = 100, 40

    def by_hand(sample_id: str, view: int):
        rng = np.random.default_rng([0, zlib.crc32(sample_id.encode()), view])
        for _ in range(10):
            target = width * height * rng.uniform(*CROP_SCALE)
            ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
                return x0, y0, x0 + w, y0 + h
        return 30.0, 0.0, 70.0, 40.0

    fallbacks = 0
    for k in range(64):
        boxes = view_boxes(width, height, views=8, seed=0, sample_id=f"{k}.jpg")
        expected = [by_hand(f"{k}.jpg", view) for view in range(1, 8)]
        np.testing.assert_allclose(boxes[1:], expected, rtol=1e-6)
        fallbacks += sum(box == (30.0, 0.0, 70.0, 40.0) for box in expected)
    assert 20 < fallbacks < 80  # the fallback is exercised (42 of the 448 views)


@pytest.mark.parametrize("width, height, square", [(100, 1, (49.5, 0, 50.5, 1)), (1, 100, (0, 49.5, 1, 50.5))])
def test_a_random_view_of_a_thin_image_falls_back_to_its_centre_square(width, height, square):
    """No box of 25-100 % of the area with a ratio in 3/4..4/3 fits a 100 x 1 image."""
    boxes = view_boxes(width, height, views=4, seed=0, sample_id="thin.jpg")
    np.testing.assert_allclose(boxes, [square] * 4)


def test_boxes_are_deterministic_per_seed_id_and_view():
    a = view_boxes(640, 480, views=4, seed=0, sample_id="cat/1.jpg")
    np.testing.assert_array_equal(a, view_boxes(640, 480, views=4, seed=0, sample_id="cat/1.jpg"))
    # a view's box does not depend on how many views there are
    np.testing.assert_array_equal(a[:2], view_boxes(640, 480, views=2, seed=0, sample_id="cat/1.jpg"))
    assert not np.array_equal(a[1], a[2]) and not np.array_equal(a[2], a[3])
    assert not np.array_equal(a[1:], view_boxes(640, 480, views=4, seed=1, sample_id="cat/1.jpg")[1:])
    assert not np.array_equal(a[1:], view_boxes(640, 480, views=4, seed=0, sample_id="cat/2.jpg")[1:])


def test_crop_resize_takes_the_box_at_any_decode_scale():
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[20:60, 40:80] = (250, 10, 10)  # a red square at x 40..80, y 20..60
    image = Image.fromarray(pixels)
    out = crop_resize(image, np.array([40, 20, 80, 60], np.float32), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    red = (250, 10, 10)
    assert (np.abs(out[2:-2, 2:-2].astype(int) - red) <= 2).all()  # bicubic bleeds ~1 px at the border
    assert out[..., 0].mean() > 240
    assert (crop_resize(image, np.array([0, 0, 30, 20], np.float32), 32) < 3).all()  # a box off the square
    # the same box in source pixels on an image decoded at half size
    half = image.resize((60, 40), Image.Resampling.BOX)
    out = crop_resize(half, np.array([40, 20, 80, 60], np.float32), 32, span=(0, 0, 120, 80))
    assert (np.abs(out[2:-2, 2:-2].astype(int) - red) <= 2).all() and out[..., 0].mean() > 240
    one = crop_resize(Image.new("RGB", (1, 1), (9, 99, 199)), view_boxes(1, 1, views=2, seed=0, sample_id="p")[1], 16)
    assert (one == (9, 99, 199)).all()



@pytest.mark.parametrize("span, centre", [((0, 0, 208, 32), 12.5), ((-7, 0, 201, 32), 13.375)])
def test_crop_resize_maps_the_box_through_the_span_the_decoded_pixels_cover(span, centre):
    """A 1/8 decode of a 201 x 32 source is 26 x 4 px and covers source x 0..208 — or, mirrored by
    EXIF, -7..201 — so source box x 80..120 is decoded x 10..15, or 10.875..15.875."""
    ramp = np.broadcast_to((np.arange(26) * 9).astype(np.uint8)[None, :, None], (4, 26, 3))  # column j holds 9 j
    out = crop_resize(Image.fromarray(np.ascontiguousarray(ramp)), np.array([80, 0, 120, 32], np.float32), 8, span=span)
    assert abs(out.mean() - 9 * (centre - 0.5)) < 1  # a linear ramp: the mean is its value at the box's centre
    past = np.array([190, 0, 201.0001, 32], np.float32)  # a hair past the source's edge still crops
    assert crop_resize(Image.fromarray(np.ascontiguousarray(ramp)), past, 8, span=span).shape == (8, 8, 3)
    # the same along y: a column ramp, the decode covering source y -7..201 of a 32 x 201 source
    column = np.ascontiguousarray(ramp.transpose(1, 0, 2))  # (26, 4, 3): row j holds 9 j
    flipped = (span[1], span[0], span[3], span[2])
    out = crop_resize(Image.fromarray(column), np.array([0, 80, 32, 120], np.float32), 8, span=flipped)
    assert abs(out.mean() - 9 * (centre - 0.5)) < 1
