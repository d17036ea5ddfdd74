"""High-resolution targets by tiling (`@RxK`): the layout, the stitching, the store and training's pairing.

Letters: B batch, R a tile's side, G the canvas grid, C channels.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from radio_distill.cache.build import build_cache
from radio_distill.cache.config import CacheConfig, Storage, load_cache_config
from radio_distill.cache.sample_data import make_sample_dataset
from radio_distill.cache.teachers import (Teacher, TeacherSpec, TiledTeacher, build_teacher, identity, parse_teacher,
                                          tile_layout, tiled_specs, tiny_teachers)
from radio_distill.errors import TeacherSpecError
from radio_distill.store import codecs
from radio_distill.store import layout as L
from radio_distill.store.dataset import load_rgb
from radio_distill.store.group import open_store
from radio_distill.store.reader import CacheReader
from radio_distill.store.views import crop_resize
from radio_distill.train.step import pair_teachers


class PatchColour(Teacher):
    """A base teacher whose token is its patch's mean colour (and summary the mean of those)."""

    def __init__(self, side=32, patch=8):
        super().__init__(TeacherSpec("p", "timm", "patch-colour", resolution=side), nn.Linear(1, 1), resolution=side,
                         mean=(0, 0, 0), std=(1, 1, 1), patch=patch)

    def forward(self, x):
        tokens = nn.functional.avg_pool2d(x, self.patch).permute(0, 2, 3, 1)  # (B, g, g, 3)
        return tokens.mean((1, 2)), tokens


def test_the_spec_takes_tiles_and_refuses_silly_ones():
    spec = parse_teacher("sig=timm:vit_so400m_patch14_siglip_384@384x2")
    assert (spec.name, spec.resolution, spec.tiles) == ("sig", 384, 2)
    assert parse_teacher("clip:ViT-B-16:openai@224").tiles == 1
    for bad, why in (("@384x1", "tiles x1 must be 2 to 8"), ("@384x9", "tiles x9 must be 2 to 8"),
                     ("@384x0", "tiles x0 must be 2 to 8"), ("@x2", "bad teacher spec")):
        with pytest.raises(TeacherSpecError, match=why):
            parse_teacher(f"timm:vit_small_patch16_224{bad}")
    cfg = load_cache_config(None, teachers=["sig=timm:vit_small_patch16_224@224x3"], data="d", out="o",
                            spatial_codec="fp16")
    assert [(s.name, s.tiles) for s in cfg.teachers] == [("sig", 1), ("sig_x3", 3)]
    assert cfg.storage["sig"] == cfg.storage["sig_x3"] and cfg.storage["sig"].spatial == "fp16"
    assert "tiles" not in identity(cfg.teachers[0]) and identity(cfg.teachers[1])["tiles"] == 3


def test_the_layout_puts_every_tile_on_the_canvas_token_grid():
    assert tile_layout(384, 16, 2) == (720, 48, [0, 336])  # 24-token tiles overlapping by 3: a 45-token map
    assert tile_layout(112, 14, 2) == (210, 14, [0, 98])
    assert tile_layout(1024, 16, 3) == (2816, 128, [0, 896, 1792])
    for r, p, k in ((384, 16, 2), (448, 14, 4), (64, 8, 3)):
        canvas, overlap, offsets = tile_layout(r, p, k)
        assert canvas % p == 0 and overlap % p == 0 and all(o % p == 0 for o in offsets)
        assert offsets[-1] + r == canvas and overlap >= p


def test_a_local_feature_stitches_to_itself_exactly():
    """Tiles of a teacher whose tokens depend only on their patch give the canvas's own tokens: the blend
    of equal values is that value, so no seam shows."""
    base = PatchColour()
    tiled = TiledTeacher(replace(base.spec, tiles=3), base)
    x = torch.rand(2, 3, tiled.resolution, tiled.resolution)
    summary, spatial = tiled(x)
    assert spatial.shape == (2, tiled.resolution // 8, tiled.resolution // 8, 3)
    torch.testing.assert_close(spatial, base(x)[1], rtol=0, atol=1e-6)
    small = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(summary, base(small)[0])


def test_seams_blend_linearly_over_the_overlap():
    """Two tiles that disagree by a constant: outside the overlap each keeps its own value; across it the
    value moves between them in equal steps (weights falling linearly to each tile's edge)."""
    base = PatchColour(side=32, patch=8)
    tiled = TiledTeacher(replace(base.spec, tiles=2), base)  # 4-token tiles, 1-token overlap: a 7-token canvas
    assert tiled.resolution == 56
    calls = iter(range(4))

    def by_tile(x):  # tile n's tokens are n everywhere; no summary (as SAM)
        return None, torch.full((len(x), 4, 4, 1), float(next(calls)))

    base.forward = by_tile
    _, spatial = tiled(torch.zeros(1, 3, 56, 56))
    row = spatial[0, 0, :, 0]  # tiles 0 and 1 along x; the overlap is token 3 where both have weight 1/2
    torch.testing.assert_close(row, torch.tensor([0, 0, 0, 0.5, 1, 1, 1.]))
    torch.testing.assert_close(spatial[0, :, 0, 0], torch.tensor([0, 0, 0, 1, 2, 2, 2.]))  # tiles 0 and 2
    torch.testing.assert_close(spatial[0, 3, 3, 0], torch.tensor(1.5))  # all four, equally


@pytest.fixture(scope="module")
def tiled_store(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("tiled")
    images = make_sample_dataset(root / "data", images=8, size=96)
    base = {s.name: s for s in tiny_teachers()}
    specs = [base["clip"], *tiled_specs(replace(base["dinov2"], tiles=2)), *tiled_specs(replace(base["sam"], tiles=2))]
    cfg = CacheConfig(data=images, out=root / "cache.zarr", teachers=tuple(specs), views=2, shard_size=4, workers=1,
                      storage={s.name: Storage(spatial="fp16", summary="fp16") for s in specs})
    build_cache(cfg, progress=False)
    return cfg, images


def test_the_store_holds_the_stitched_map_of_each_view_beside_the_global_one(tiled_store):
    cfg, images = tiled_store
    root = open_store(cfg.out)
    specs = {s.name: s for s in cfg.teachers}
    tiles = root[L.teacher_group("dinov2_x2")].attrs["tiles"]
    assert tiles["tiles"] == 2 and tiles["overlap"] == 14 and len(tiles["boxes"]) == 4
    assert tiles["boxes"][0] == [0, 0, 112 / 210, 112 / 210]
    assert "tiles" not in root[L.teacher_group("dinov2")].attrs
    assert root[L.target_array("dinov2", "spatial")].shape[2:] == (8, 8, 48)
    assert root[L.target_array("dinov2_x2", "spatial")].shape[2:] == (15, 15, 48)
    assert root[L.target_array("sam_x2", "spatial")].shape[2:] == (15, 15, 32)
    assert L.target_array("sam_x2", "summary") not in root
    k = 3
    boxes = root[L.BOXES][k]
    image, span, _ = load_rgb(images / str(root[L.IDS][k]), min_side=210)  # as the workers: the largest side
    for name in ("dinov2_x2", "sam_x2", "dinov2"):
        teacher = build_teacher(specs[name])
        pixels = np.stack([crop_resize(image, boxes[v], teacher.resolution, span=span) for v in range(2)])
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
        x = (x - torch.tensor(teacher.mean).view(1, 3, 1, 1)) / torch.tensor(teacher.std).view(1, 3, 1, 1)
        with torch.inference_mode():
            summary, spatial = teacher(x)
        stored = torch.from_numpy(root[L.target_array(name, "spatial")][k].astype(np.float32))
        torch.testing.assert_close(stored, spatial, rtol=2e-3, atol=2e-3)  # fp16
        assert codecs.token_cosine(spatial.flip(0), stored).mean() < 0.99  # the views differ
        if summary is not None:
            stored = torch.from_numpy(root[L.target_array(name, "summary")][k].astype(np.float32))
            torch.testing.assert_close(stored, summary, rtol=2e-3, atol=2e-3)


def test_training_pairs_each_side_with_the_closer_map(tiled_store):
    cfg, _ = tiled_store
    reader = CacheReader(cfg.out)
    pairing = pair_teachers(reader.teachers, (64, 112, 176, 224))
    assert pairing[64] == ["clip", "dinov2", "sam"]  # dinov2 at 112, sam at 64 (its canvas: 120)
    assert pairing[112] == ["clip", "dinov2", "sam_x2"]
    assert pairing[176] == pairing[224] == ["clip", "dinov2_x2", "sam_x2"]  # dinov2's canvas: 210


def test_a_student_trains_at_both_sides_and_info_shows_the_tiles(tiled_store, tmp_path):
    from typer.testing import CliRunner

    from radio_distill.cli import cache_app
    from radio_distill.train.config import TrainConfig
    from radio_distill.train.loop import train

    cfg, _ = tiled_store
    run = TrainConfig(store=cfg.out, out=tmp_path / "run", student="test_vit", steps=2, batch_size=(4, 2),
                      resolution=(64, 176), resolution_policy="partition", workers=0, device="cpu", holdout=0.1)
    result = train(run, progress=False)
    assert result["step"] == 2
    result = CliRunner().invoke(cache_app, ["info", str(cfg.out)])
    assert result.exit_code == 0, result.output
    assert "dinov2_x2" in result.output and "2x2 tiles" in result.output
