"""`radio-train --denoise shift`: the teacher's map of another view, resampled through the two boxes onto the
student's view, equals the image-space field it samples; a pattern fixed to the teacher's grid is no longer what
the loss is minimised by (closed forms, and the real loss minimised); the loader pairs each view with another
of the same image, and a run records the setting and resumes only with it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from radio_distill.errors import TrainingError
from radio_distill.store.reader import CacheReader, decode_targets
from radio_distill.store.views import view_boxes
from radio_distill.train.loop import train
from radio_distill.train.losses import amradio_spatial_loss, phis_spatial_loss
from radio_distill.train.shift import resample, shift_targets, token_centres

from .conftest import config


def field(xy: torch.Tensor) -> torch.Tensor:
    """An image-space field, linear in (x, y), so bilinear reading between token centres is exact:
    (..., 2) -> (..., 3)."""
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([0.5 * x - 0.25 * y + 3, -x + 2 * y, 0.125 * x + 0.75 * y - 7], -1)


def test_token_centres_are_the_grid_cell_centres_over_the_box():
    centres = token_centres(torch.tensor([[10.0, 20.0, 18.0, 24.0]]), (2, 4))[0]  # 2 px wide cells, 2 px tall
    assert torch.equal(centres[..., 0], torch.tensor([[11.0, 13, 15, 17], [11, 13, 15, 17]]))
    assert torch.equal(centres[..., 1], torch.tensor([[21.0, 21, 21, 21], [23, 23, 23, 23]]))


def test_view_b_resampled_onto_view_a_is_the_field_at_a_s_tokens_over_the_overlap():
    grid = (8, 8)
    a = torch.tensor([[10.0, 20.0, 42.0, 52.0]])  # 4 px tokens, centres x 12, 16, ..., 40 and y 22, ..., 50
    b = torch.tensor([[20.0, 10.0, 68.0, 58.0]])  # 6 px tokens, centres x 23, ..., 65 and y 13, ..., 55
    teacher_b = field(token_centres(b, grid))  # (1, 8, 8, 3): the teacher's map of b samples the field
    moved, inside = resample(teacher_b, b, a, grid)
    centres = token_centres(a, grid)[0]
    x, y = centres[..., 0], centres[..., 1]
    assert torch.equal(inside[0], (x >= 20) & (x <= 68) & (y >= 10) & (y <= 58))  # a's tokens whose centre is in b
    assert inside[0].sum() == 6 * 8  # a's columns x 20, ..., 40, every row
    # between b's token centres, bilinear reading of a linear field is exact: the field at a's token centres
    hull = (x >= 23) & (x <= 65) & (y >= 13) & (y <= 55)
    assert hull.sum() == 5 * 8 and torch.allclose(moved[0][hull], field(centres)[hull], atol=1e-4)
    # in b's outer half token (a's column x = 20), border padding holds b's edge value: the field at x = 23
    edge = inside[0] & ~hull
    assert edge.sum() == 8
    clamped = torch.stack([x.clamp(23, 65), y.clamp(13, 55)], -1)
    assert torch.allclose(moved[0][edge], field(clamped)[edge], atol=1e-4)


def test_shift_targets_weigh_the_overlap_per_image_and_fall_back_without_one():
    grid, C = (4, 4), 2
    same, other = torch.randn(2, *grid, C), torch.randn(2, *grid, C)
    boxes = torch.tensor([[[0.0, 0, 8, 8], [4, 0, 12, 8]],  # b is a shifted right by half: two columns overlap
                          [[0.0, 0, 8, 8], [20, 20, 28, 28]]])  # no overlap: a's own target, every token
    target, weight = shift_targets(same, other, boxes)
    assert torch.equal(weight[0], torch.tensor([[0, 0, 1, 1.0]] * 4) / 8)
    assert torch.allclose(target[0][:, 2:], other[0][:, :2], atol=1e-6)  # a's columns 2, 3 are b's 0, 1
    assert torch.equal(target[1], same[1]) and torch.equal(weight[1], torch.full(grid, 1 / 16))
    # the weighted losses: each image's mean over its overlap, averaged over images
    pred = torch.randn(2, 16, C)
    per = ((pred - target.flatten(1, 2)) ** 2).mean(-1)  # (2, 16)
    want = (per[0].reshape(4, 4)[:, 2:].mean() + per[1].mean()) / 2
    assert phis_spatial_loss(pred, target.flatten(1, 2), 2.0, weight.flatten(1)).item() == pytest.approx(want / 2)
    # uniform weights are the plain losses
    uniform = torch.full((2, 16), 1 / 16)
    goal = torch.randn(2, 16, C)
    assert amradio_spatial_loss(pred, goal, uniform).item() == pytest.approx(amradio_spatial_loss(pred, goal).item())


def optimum(targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The (h, w, C) output, one for every pair (a pattern of the student's own grid), minimising the weighted MSE
    sum_pairs sum_tokens weight * |S - target|^2: the weight-averaged target at each token."""
    return (weights[..., None] * targets).sum(0) / weights.sum(0)[..., None]


def test_a_grid_fixed_pattern_is_the_plain_optimum_and_cancels_under_the_shift_loss():
    """No image content, only a pattern P fixed to the teacher's grid (every view's map is P). Student view a is
    the box of 1 px tokens at the origin; view b is a shifted one token right (b's token j - 1 lies under a's j:
    -P there) or one token down (P again, P being constant down the grid): both overlap 56 tokens."""
    h = w = 8
    P = torch.tensor([(-1.0) ** j for j in range(w)]).expand(h, w)[..., None]  # (8, 8, 1) columns +1, -1, ...
    a = [0.0, 0, 8, 8]
    boxes = torch.tensor([[a, [1.0, 0, 9, 8]], [a, [0.0, 1, 8, 9]]])
    maps = P.expand(2, h, w, 1)
    target, weight = shift_targets(maps, maps, boxes)
    assert torch.equal(target[0][:, 1:], -P[:, 1:]) and torch.equal(target[1][1:], P[1:])
    best = optimum(target, weight)
    assert torch.allclose(best[1:, 1:], torch.zeros(7, 7, 1), atol=1e-6)  # where both pairs see a token: no P
    assert torch.allclose(optimum(maps, torch.full((2, h, w), 1 / 64)), P)  # the same-view loss: P itself
    # the real loss, minimised by gradient descent on a free output, reaches that optimum
    S = torch.zeros(1, h * w, 1, requires_grad=True)
    opt = torch.optim.SGD([S], lr=20.0)
    for _ in range(300):
        opt.zero_grad()
        phis_spatial_loss(S.expand(2, -1, -1), target.flatten(1, 2), 1.0, weight.flatten(1)).backward()
        opt.step()
    seen = weight.sum(0) > 0  # every token but (0, 0), which no pair's overlap holds
    assert seen.sum() == h * w - 1 and not seen[0, 0]
    assert torch.allclose(S.detach().reshape(h, w, 1)[seen], best[seen], atol=1e-4)


def test_over_random_cached_boxes_the_shift_optimum_keeps_little_of_a_grid_fixed_pattern():
    """Pairs (view 0, view 1) of random images' cached boxes (`view_boxes`, V = 2 as the benchmarks build); P is
    two seeded high-norm tokens and a checkerboard, each its own channel, the kinds of ViT artifact fixed to
    single positions. The same-view optimum is P (share 1); under the shift loss it keeps a small share."""
    h = w = 8
    rng = np.random.default_rng(0)
    spots = torch.zeros(h * w)
    spots[torch.from_numpy(rng.choice(h * w, 2, replace=False))] = 1
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(w)] for i in range(h)])
    P = torch.stack([spots.reshape(h, w) - spots.mean(), checker], -1)  # (8, 8, 2), zero mean over positions
    sizes = rng.integers(48, 97, (400, 2))
    boxes = torch.from_numpy(np.stack([view_boxes(int(x), int(y), views=2, seed=0, sample_id=str(k))
                                       for k, (x, y) in enumerate(sizes)]))  # (400, 2, 4)
    maps = P.expand(len(boxes), h, w, 2)
    target, weight = shift_targets(maps, maps, boxes)
    best = optimum(target, weight)
    share = (best * P).sum((0, 1)) / (P * P).sum((0, 1))  # per channel
    assert share[0] < 0.3 and share[1].abs() < 0.05, share
    plain = optimum(maps, torch.full((len(boxes), h, w), 1 / 64))
    assert torch.allclose((plain * P).sum((0, 1)) / (P * P).sum((0, 1)), torch.ones(2))


def test_the_loader_pairs_each_view_with_another_view_of_its_image(train_store):
    reader = CacheReader(train_store, denoise="shift")
    assert reader.pairs and reader.teachers[0].pattern == {}
    rows = np.asarray(reader.indices(holdout=0.1))
    loader = reader.loader(rows, resolution=32, batch_size=8, seed=0, start_step=0, steps=1, workers=0)
    batch = next(iter(loader))
    views, stored = batch["view"].numpy(), reader.boxes[batch["index"].numpy()]  # (8, V, 4)
    other = 1 - views  # V = 2: the other view is the one not trained on
    want = np.stack([stored[np.arange(8), views], stored[np.arange(8), other]], 1)
    assert np.array_equal(batch["boxes"].numpy(), want)
    dataset = reader.dataset(resolution=32)
    for k, (i, v) in enumerate(zip(batch["index"].tolist(), other.tolist())):  # b's targets as the store holds them
        item = dataset[(i, v)]
        for name in batch["other"]:
            assert torch.equal(batch["other"][name][k], item[name]), name
    assert not any("summary" in name for name in batch["other"])  # one spatial read more, nothing else
    decoded = decode_targets(batch["other"], reader.teachers, torch.device("cpu"))
    assert all(d["summary"] is None and d["spatial"].shape[0] == 8 for d in decoded.values())


def test_a_run_records_shift_and_resumes_only_with_it(store_copy, tmp_path):
    run = config(store_copy, tmp_path / "run", steps=4, stop_at=2, denoise="shift")
    assert train(run, progress=False)["step"] == 2  # no `radio-cache pattern` needed
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["denoise"] == "shift" and saved["patterns"] is None
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(x)) for x in rows[-1].split(",")[1:])
    with pytest.raises(TrainingError, match="was started with denoise=shift; an exact resume needs the same"):
        train(replace(run, stop_at=None, resume=True, denoise="none"), progress=False)
    assert train(replace(run, stop_at=None, resume=True), progress=False)["step"] == 4
