"""Frozen-backbone features of a list of images: CLS token and mean patch token, batched.

Images (uint8, grey or RGB, any size) are brought to RGB, resized to a square side that
is a multiple of the patch size, and normalised with the ImageNet statistics the backbone
expects. Images of one size are resized together in one call, so the preparation stays
small beside the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class Features:
    cls: np.ndarray  # (N, D) float32, final-norm CLS token
    patch_mean: np.ndarray  # (N, D) float32, mean of the final-norm patch tokens

    def concatenated(self) -> np.ndarray:
        """CLS ⊕ mean patch, (N, 2D): what the linear probe reads."""
        return np.concatenate([self.cls, self.patch_mean], axis=1)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_resolution(requested: int, patch_size: int) -> int:
    """``requested`` rounded to the nearest multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, int(requested / patch_size + 0.5) * patch_size)  # halves round up


def images_to_tensor(images: list[np.ndarray], side: int, normalise: bool = True) -> torch.Tensor:
    """uint8 (H, W) / (H, W, 3) arrays of any sizes -> float (B, 3, side, side)."""
    out = torch.empty(len(images), 3, side, side)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for shape, idx in by_shape.items():
        batch = torch.from_numpy(np.stack([images[i] for i in idx])).float().div_(255.0)
        batch = batch[:, None] if len(shape) == 2 else batch.permute(0, 3, 1, 2)  # (b, C, H, W), C = 1 or 3
        if batch.shape[-2:] != (side, side):
            # Antialiasing only matters when shrinking, and costs a slower kernel when enlarging.
            shrink = side < max(batch.shape[-2:])
            batch = F.interpolate(batch, size=(side, side), mode="bilinear", antialias=shrink, align_corners=False)
        out[idx] = batch  # a grey batch broadcasts over the 3 channels
    if normalise:
        out.sub_(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    return out


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: list[np.ndarray], resolution: int,
                     batch_size: int = 256, device: str = "auto") -> Features:
    """CLS and mean-patch features of every image, in order."""
    dev = pick_device(device)
    backbone = backbone.to(dev).eval()
    side = model_resolution(resolution, backbone.patch_size)
    cls_parts, mean_parts = [], []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size], side).to(dev, non_blocking=True)
        out = backbone.forward_features(x)
        cls_parts.append(out["x_norm_clstoken"].float().cpu())
        mean_parts.append(out["x_norm_patchtokens"].float().mean(dim=1).cpu())  # (b, P, D) -> (b, D)
    dim = backbone.embed_dim
    cls = torch.cat(cls_parts).numpy() if cls_parts else np.zeros((0, dim), np.float32)
    patch_mean = torch.cat(mean_parts).numpy() if mean_parts else np.zeros((0, dim), np.float32)
    return Features(cls, patch_mean)


@torch.inference_mode()
def extract_patch_grid(backbone: torch.nn.Module, images: list[np.ndarray], resolution: int,
                       device: str = "auto") -> np.ndarray:
    """Patch features of a few images laid out on their grid: (N, h, w, D)."""
    dev = pick_device(device)
    backbone = backbone.to(dev).eval()
    side = model_resolution(resolution, backbone.patch_size)
    grid = side // backbone.patch_size
    patches = backbone.forward_features(images_to_tensor(images, side).to(dev))["x_norm_patchtokens"]
    return patches.float().cpu().reshape(len(images), grid, grid, -1).numpy()  # (N, P, D) -> (N, h, w, D)


def pixel_features(images: list[np.ndarray], side: int = 32) -> np.ndarray:
    """The raw-pixel baseline: each image resized to ``side`` and flattened, (N, 3 * side * side)."""
    if not images:
        return np.zeros((0, 3 * side * side), np.float32)
    return images_to_tensor(images, side).reshape(len(images), -1).numpy()
