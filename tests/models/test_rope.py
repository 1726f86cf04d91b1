"""Axial RoPE: relative positions only, exact coordinates, augmentation only in training."""
import math

import pytest
import torch

from models.rope import AxialRoPE, apply_rope, identity_for_prefix, patch_center_coords


def _logit(rope: AxialRoPE, q: torch.Tensor, k: torch.Tensor, pos_q: tuple[int, int], pos_k: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    sin, cos = rope(*grid)
    width = grid[1]
    index_q, index_k = pos_q[0] * width + pos_q[1], pos_k[0] * width + pos_k[1]
    rq = apply_rope(q.view(1, 1, 1, -1), sin[index_q : index_q + 1], cos[index_q : index_q + 1])
    rk = apply_rope(k.view(1, 1, 1, -1), sin[index_k : index_k + 1], cos[index_k : index_k + 1])
    return (rq * rk).sum()


@pytest.mark.parametrize("grid", [(6, 6), (4, 7)])
def test_logits_depend_only_on_the_relative_offset(grid: tuple[int, int]) -> None:
    rope = AxialRoPE(head_dim=16, rescale=2.0).eval()
    q, k = torch.randn(16), torch.randn(16)
    base = _logit(rope, q, k, (0, 1), (2, 3), grid)
    for dy, dx in [(1, 0), (0, 2), (1, 2)]:  # both positions stay inside every grid tested
        shifted = _logit(rope, q, k, (0 + dy, 1 + dx), (2 + dy, 3 + dx), grid)
        torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-5)
    other_offset = _logit(rope, q, k, (0, 1), (3, 3), grid)
    assert not torch.allclose(other_offset, base, atol=1e-3)


def test_coordinates_are_patch_centres_in_minus_one_one_per_axis() -> None:
    coords = patch_center_coords(2, 4)
    assert coords.shape == (8, 2)
    assert coords[:, 0].tolist() == pytest.approx([-0.5] * 4 + [0.5] * 4)
    assert coords[:4, 1].tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])


def test_angles_are_y_then_x_periods_of_base_100_tiled_twice() -> None:
    rope = AxialRoPE(head_dim=16).eval()
    sin, cos = rope(1, 2)
    assert sin.shape == (2, 16) and sin.dtype == torch.float32
    y, x = 0.0, 0.5  # the second patch of a 1x2 grid
    expected = [2 * math.pi * c / 100 ** (k / 4) for c in (y, x) for k in range(4)] * 2
    assert sin[1].tolist() == pytest.approx([math.sin(a) for a in expected], abs=1e-5)
    assert cos[1].tolist() == pytest.approx([math.cos(a) for a in expected], abs=1e-5)


def test_prefix_tokens_are_not_rotated() -> None:
    sin, cos = identity_for_prefix(*AxialRoPE(head_dim=8).eval()(2, 2), n_prefix=3)
    x = torch.randn(1, 2, 3 + 4, 8, dtype=torch.bfloat16)
    out = apply_rope(x, sin, cos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[:, :, :3], x[:, :, :3], rtol=0, atol=0)
    assert not torch.equal(out[:, :, 3:], x[:, :, 3:])


def test_augmentation_only_in_training() -> None:
    rope = AxialRoPE(head_dim=16, shift=0.1, jitter=1.2, rescale=2.0)
    rope.eval()
    torch.testing.assert_close(rope(3, 5)[0], rope(3, 5)[0], rtol=0, atol=0)
    rope.train()
    assert not torch.allclose(rope(3, 5)[0], rope(3, 5)[0])


def test_head_dim_must_split_in_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        AxialRoPE(head_dim=10)
