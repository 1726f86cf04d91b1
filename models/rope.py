"""Axial rotary position embedding for patch tokens (DINOv3 style), with training-time coordinate augmentation."""
import math

import torch
from torch import nn


def patch_center_coords(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(H*W, 2) patch centres as (y, x), each axis normalised separately to [-1, 1], row-major like the tokens."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (H, W, 2)
    return 2.0 * grid.flatten(0, 1) - 1.0


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, N, head_dim) by (N, head_dim) tables (rows of prefix tokens: sin 0, cos 1, see
    `identity_for_prefix`). Rotate-half pairs dimension d with d + head_dim/2; the tables repeat across the two
    halves, so only their first half is read. Runs in fp32, returns x's dtype."""
    half = x.shape[-1] // 2
    first, second = x.float().split(half, dim=-1)
    s, c = sin[:, :half], cos[:, :half]
    return torch.cat([first * c - second * s, second * c + first * s], dim=-1).to(x.dtype)


def identity_for_prefix(sin: torch.Tensor, cos: torch.Tensor, n_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend n_prefix rows that leave tokens unrotated (CLS and storage tokens get no position)."""
    return (torch.cat([sin.new_zeros(n_prefix, sin.shape[1]), sin]),
            torch.cat([cos.new_ones(n_prefix, cos.shape[1]), cos]))


class AxialRoPE(nn.Module):
    """sin/cos tables for an H x W patch grid: head_dim/4 periods base**(k/(head_dim/4)); the first half of the
    angles comes from y, the second from x, the whole tiled twice so rotate-half pairs dimension d with d + head_dim/2.

    In training mode the coordinates are augmented: shifted by U[-shift, shift] per axis, scaled by a log-uniform
    factor in [1/jitter, jitter] per axis, then by one log-uniform factor in [1/rescale, rescale]. No parameters.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 100.0,
        shift: float | None = None,
        jitter: float | None = None,
        rescale: float | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"axial RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.base = base
        self.shift = shift
        self.jitter = jitter
        self.rescale = rescale

    def periods(self, device: torch.device | None = None) -> torch.Tensor:
        n_periods = self.head_dim // 4
        return self.base ** (torch.arange(n_periods, device=device, dtype=torch.float32) / n_periods)

    def augment(self, coords: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            coords = coords + torch.empty(2, device=coords.device).uniform_(-self.shift, self.shift)
        if self.jitter is not None:
            log_jitter = math.log(self.jitter)
            coords = coords * torch.empty(2, device=coords.device).uniform_(-log_jitter, log_jitter).exp()
        if self.rescale is not None:
            log_rescale = math.log(self.rescale)
            coords = coords * torch.empty(1, device=coords.device).uniform_(-log_rescale, log_rescale).exp()
        return coords

    def angles_at(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (P, head_dim) fp32, for (P, 2) coordinates in (y, x) order."""
        periods = self.periods(coords.device)
        angles = 2 * math.pi * coords[:, :, None] / periods  # (P, 2, head_dim/4)
        angles = angles.flatten(1, 2).tile(2)  # (P, head_dim)
        return torch.sin(angles), torch.cos(angles)

    def forward(self, height: int, width: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=torch.device(device or "cpu").type, enabled=False):
            coords = patch_center_coords(height, width, device)
            if self.training:
                coords = self.augment(coords)
            return self.angles_at(coords)
