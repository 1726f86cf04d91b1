"""PCA patch maps, the classic DINO picture: 3 principal components of patch features as RGB.

The components are fitted on the patches of all the shown images together, so colours
mean the same thing across the grid; each component is scaled to [0, 1] over those
patches. The grid puts each input above its map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pca_rgb(patch_grid: np.ndarray) -> np.ndarray:
    """(N, h, w, D) patch features -> (N, h, w, 3) in [0, 1] from the first 3 principal components."""
    n, h, w, d = patch_grid.shape
    flat = torch.as_tensor(patch_grid, dtype=torch.float64).reshape(n * h * w, d)  # (N*h*w, D)
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal directions
    n_comp = min(3, v.shape[0])
    proj = centred @ v[:n_comp].T  # (N*h*w, n_comp)
    if n_comp < 3:  # fewer patches or dims than 3: the missing channels stay black
        proj = torch.cat([proj, torch.zeros(proj.shape[0], 3 - n_comp, dtype=proj.dtype)], dim=1)
    low, high = proj.min(dim=0).values, proj.max(dim=0).values
    scaled = (proj - low) / (high - low).clamp(min=1e-12)
    return scaled.reshape(n, h, w, 3).float().numpy()


def save_pca_grid(images: list[np.ndarray], rgb_maps: np.ndarray, path: str | Path,
                  cell: int = 96) -> Path:
    """A PNG of 2 rows (inputs, maps) and one ``cell``-pixel column per image; returns its path."""
    if len(images) != len(rgb_maps):
        raise ValueError("PCA grid: one map per image is expected")
    canvas = Image.new("RGB", (cell * len(images), 2 * cell))
    for i, (image, rgb) in enumerate(zip(images, rgb_maps, strict=True)):
        shown = Image.fromarray(image).convert("RGB").resize((cell, cell), Image.BILINEAR)
        pca = Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
        canvas.paste(shown, (i * cell, 0))
        canvas.paste(pca, (i * cell, cell))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path
