"""The resize of student maps to a teacher's grid, on known answers."""

import pytest
import torch

from radio_distill.train.step import to_grid


def test_identity_when_the_grids_match_tokens_row_major():
    c, i, j = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    spatial = (100 * c + 10 * i + j).float()[None]  # (1, C, h, w): the value names its position
    tokens = to_grid(spatial, (4, 5))  # (1, T, C)
    assert tokens.shape == (1, 20, 3)
    assert tokens[0, 2 * 5 + 3].tolist() == [23.0, 123.0, 223.0]  # token y * w + x, channels in order
    assert torch.equal(tokens, spatial.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("size, grid", [((8, 8), (3, 5)), ((2, 2), (7, 7)), ((4, 6), (4, 3))])
def test_a_constant_map_stays_constant(size, grid):
    spatial = torch.full((2, 4, *size), 1.5)
    spatial[:, 1] = -2.0
    tokens = to_grid(spatial, grid)
    assert tokens.shape == (2, grid[0] * grid[1], 4)
    assert torch.allclose(tokens[..., 1], torch.tensor(-2.0)) and torch.allclose(tokens[..., 0], torch.tensor(1.5))


def test_two_by_two_shrinks_to_its_average():
    spatial = torch.tensor([[1.0, 2.0], [3.0, 10.0]]).view(1, 1, 2, 2)
    assert to_grid(spatial, (1, 1)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("shape, grid", [((1, 1, 1, 4), (1, 1)), ((1, 1, 4, 1), (1, 4))])
def test_shrinking_either_axis_is_antialiased(shape, grid):
    """A row (or column) 0, 0, 0, 8 shrunk to one token: antialiased bilinear weighs the 4 values by the
    triangle 1 - |d| / 4 at d = -1.5, -0.5, 0.5, 1.5 (5/8, 7/8, 7/8, 5/8 over 3), so 8 x 5/24 = 5/3, where
    plain bilinear would sample between the middle two (0). Widening the other axis changes nothing."""
    spatial = torch.tensor([0.0, 0.0, 0.0, 8.0]).view(shape)
    tokens = to_grid(spatial, grid)
    assert tokens.shape == (1, grid[0] * grid[1], 1)
    assert torch.allclose(tokens, torch.tensor(5 / 3))
