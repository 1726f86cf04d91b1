"""Augmented copies of images for the copy-detection check: crop, flip, tone change, JPEG.

Each copy keeps its source's size and mode (grey stays grey), so it goes through the same
feature pipeline as the originals. The augmentations are drawn from ``seed`` alone.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance


def make_copies(images: list[np.ndarray], seed: int = 0, min_crop_area: float = 0.6,
                jpeg_quality: int = 60) -> list[np.ndarray]:
    """One augmented copy of every image (uint8 (H, W) or (H, W, 3) in, same shape out)."""
    rng = np.random.default_rng(seed)
    return [_copy_of(image, rng, min_crop_area, jpeg_quality) for image in images]


def _copy_of(image: np.ndarray, rng: np.random.Generator, min_crop_area: float,
             jpeg_quality: int) -> np.ndarray:
    pil = Image.fromarray(image)
    w, h = pil.size
    side = np.sqrt(rng.uniform(min_crop_area, 1.0))
    cw, ch = max(1, int(round(w * side))), max(1, int(round(h * side)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    pil = pil.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.8, 1.2))
    pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.8, 1.2))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=jpeg_quality)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert(pil.mode), dtype=np.uint8)
