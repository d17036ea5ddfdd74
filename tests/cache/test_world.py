"""The generated world: known answers agree with the pixels, seeds separate splits, files on disk."""

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from radio_distill.cache.world import SHAPES, SIDES, _alpha, make_scenes, write_scenes
from radio_distill.cli import cache_app


def test_scenes_answers_agree_with_pixels():
    scenes = make_scenes(60, seed=0)
    assert any(s.image.shape[0] != s.image.shape[1] for s in scenes)  # odd sizes, not only squares
    assert any(len(s.things) > 1 for s in scenes) and any(len(s.things) == 1 for s in scenes)
    occluded = 0
    for s in scenes:
        H, W = s.classes.shape
        assert s.image.shape == (H, W, 3) and SIDES[0] <= min(H, W) and max(H, W) <= SIDES[1]
        assert ((s.classes > 0) == (s.instances > 0)).all()
        for k, t in enumerate(s.things):
            inside = s.instances == k + 1
            assert (s.classes[inside] == SHAPES.index(t.shape) + 1).all() and inside.sum() == t.area
        areas = [t.area for t in s.things]
        assert s.main == int(np.argmax(areas)) and s.label == SHAPES.index(s.things[s.main].shape)
        main = s.things[s.main]
        assert s.caption.startswith(f"a {main.size} {main.colour} {main.shape}") and s.caption.endswith(s.background)
        short = min(H, W)
        ys, xs = np.nonzero(s.instances == s.main + 1)  # the main object lies in the centred square (view 0)
        assert xs.min() >= (W - short) // 2 and xs.max() < (W + short) // 2 + 1
        assert ys.min() >= (H - short) // 2 and ys.max() < (H + short) // 2 + 1
        occluded += any((s.instances[_alpha(t, W, H) >= 0.5] > k + 1).any() for k, t in enumerate(s.things))
    assert occluded  # later objects sometimes hide part of earlier ones


def test_seeds_make_different_splits_and_repeat():
    a, b, again = make_scenes(4, seed=0), make_scenes(4, seed=1), make_scenes(4, seed=0)
    assert all((x.image == y.image).all() and x.caption == y.caption for x, y in zip(a, again))
    assert not any(x.image.shape == y.image.shape and (x.image == y.image).all() for x, y in zip(a, b))


def test_sample_scenes_command_writes_images_masks_and_captions(tmp_path):
    result = CliRunner().invoke(cache_app, ["sample", str(tmp_path), "--scenes", "--images", "6", "--seed", "3",
                                            "--no-bad"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        image = Image.open(tmp_path / "images" / row["id"])
        stem = row["id"].removesuffix(".jpg")
        classes = np.asarray(Image.open(tmp_path / "masks" / f"{stem}.png"))
        instances = np.asarray(Image.open(tmp_path / "instances" / f"{stem}.png"))
        assert image.size == tuple(row["size"]) == classes.shape[::-1] == instances.shape[::-1]
        assert row["id"].split("/")[0] == row["label"] == row["objects"][row["main"]]["shape"]
        assert set(np.unique(instances)) == set(range(len(row["objects"]) + 1)) - {
            k + 1 for k, o in enumerate(row["objects"]) if o["area"] == 0}
    assert write_scenes(tmp_path / "again", images=6, seed=3).parent.joinpath("scenes.jsonl").read_text() == \
        (tmp_path / "scenes.jsonl").read_text()
