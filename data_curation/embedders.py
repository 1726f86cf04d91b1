"""Frozen image embedders for curation: a cheap built-in one and any models/ backbone.

An embedder turns decoded RGB images into L2-normalised float32 vectors in two steps,
so that the cheap per-image work (resizing) can run apart from the batched model:

- ``prepare(image)``: one (H, W, 3) uint8 image -> a fixed-shape float32 array
- ``embed(batch)``: (B, *prepared shape) -> (B, dim), rows of unit norm

The built-in embedder (:class:`GradientHistogramEmbedder`) needs no weights: it is a
HOG-like descriptor (gradient-orientation histograms on a 4x4 and a 2x2 grid of a 32x32
grey resize, power-normalised) joined with an 8x8 grey thumbnail and coarse colour
means. Histograms pooled over cells tolerate the small shifts, crops and re-encodings of
near duplicates, and they separate handwritten digit classes well (measured in
tests/curation and bench/curation_quality.py).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from typing import Protocol

import numpy as np
from PIL import Image


class Embedder(Protocol):
    name: str
    dim: int

    def prepare(self, image: np.ndarray) -> np.ndarray: ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) float32 in [0, 1]; aspect is not kept."""
    pil = Image.fromarray(image)
    resized = pil.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0


class GradientHistogramEmbedder:
    """The built-in embedder: HOG-like histograms + thumbnail + colour, no weights."""

    name = "builtin"
    size = 32
    bins = 8

    def __init__(self) -> None:
        # 4x4 cells x 8 bins + 2x2 cells x 8 bins + 8x8 thumbnail + 2x2 chroma x 3
        self.dim = 16 * self.bins + 4 * self.bins + 64 + 12

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return _resize(image, self.size)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float32)  # (B, 3, 32, 32)
        b = x.shape[0]
        grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (B, 32, 32)
        padded = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
        gx = padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]
        gy = padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]
        magnitude = np.sqrt(gx * gx + gy * gy)
        # Unsigned orientation in [0, bins): a stroke and its mirror edge vote alike.
        position = (np.arctan2(gy, gx) % np.pi) * (self.bins / np.pi)
        low = np.floor(position).astype(np.int64) % self.bins
        frac = position - np.floor(position)
        votes = np.zeros((b, self.bins, self.size, self.size), dtype=np.float32)
        for k in range(self.bins):  # soft binning between the two nearest orientations
            votes[:, k] = magnitude * ((low == k) * (1.0 - frac) + (((low + 1) % self.bins) == k) * frac)
        fine = votes.reshape(b, self.bins, 4, 8, 4, 8).sum(axis=(3, 5)).reshape(b, -1)  # (B, 8*16)
        coarse = votes.reshape(b, self.bins, 2, 16, 2, 16).sum(axis=(3, 5)).reshape(b, -1)  # (B, 8*4)
        fine = _l2_rows(np.sqrt(_l2_rows(fine)))
        coarse = _l2_rows(np.sqrt(_l2_rows(coarse)))
        thumb = grey.reshape(b, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(b, -1)  # (B, 64)
        thumb = _l2_rows(thumb - thumb.mean(axis=1, keepdims=True))
        chroma = (x - grey[:, None]).reshape(b, 3, 2, 16, 2, 16).mean(axis=(3, 5)).reshape(b, -1)  # (B, 12)
        features = np.concatenate([fine, 0.6 * coarse, 0.6 * thumb, 2.0 * chroma], axis=1)
        return _l2_rows(features).astype(np.float32)


class BackboneEmbedder:
    """A frozen models/ backbone: the normalised CLS token of ``forward_features``."""

    def __init__(self, backbone, image_size: int = 224, device: str | None = None, name: str = "backbone"):
        import torch

        patch = int(backbone.patch_size)
        if image_size % patch:
            raise ValueError(f"embedder image_size {image_size} is not a multiple of the backbone's patch size {patch}")
        self.image_size = image_size
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = backbone.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(backbone.embed_dim)
        self.name = name

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return resize_normalize(image, self.image_size)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            cls = self.model.forward_features(x)["x_norm_clstoken"]  # (B, D)
            cls = torch.nn.functional.normalize(cls.float(), dim=1)
        return cls.cpu().numpy()


def resize_normalize(image: np.ndarray, size: int) -> np.ndarray:
    """A backbone's input: (H, W, 3) uint8 -> (3, size, size) float32, ImageNet-normalised."""
    import models

    mean = np.asarray(models.IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(models.IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return (_resize(image, size) - mean) / std


def build_preparer(spec: str, image_size: int = 224) -> Callable[[np.ndarray], np.ndarray]:
    """The ``prepare`` step of the embedder ``spec`` names, without building its model
    (decoding workers need only this)."""
    if spec == "builtin":
        return GradientHistogramEmbedder().prepare
    return partial(resize_normalize, size=image_size)


class ImageSizeError(ValueError):
    """An embedder's image size that is not a multiple of its backbone's patch size."""


def check_embedder(spec: str, image_size: int = 224, storage=None) -> None:
    """What can be told of the embedder ``spec`` (see :func:`build_embedder`) without loading a
    model: a ValueError for an unknown arch or a path that does not exist, an ImageSizeError for
    an ``image_size`` that is not a multiple of the patch size (known from an arch, or from a vfm
    or HF export's config.json; a single checkpoint file tells it only once loaded)."""
    if spec == "builtin":
        return
    if spec.startswith("arch:"):
        from models.registry import backbone_spec

        patch = backbone_spec(spec[len("arch:"):]).patch_size
    else:
        from data_curation.storage import Storage

        storage = storage or Storage()
        if not storage.exists(spec):
            raise ValueError(f"{spec} does not exist (a vfm export, an HF DINOv3 folder or a DINOv3 checkpoint)")
        config_uri = Storage.join(spec, "config.json")
        try:
            config = storage.read_json(config_uri) if storage.isdir(spec) and storage.exists(config_uri) else {}
            patch = (config.get("arch_spec") or {}).get("patch_size") or config.get("patch_size")
        except (ValueError, AttributeError, TypeError) as exc:  # not JSON, or not an object of objects
            raise ValueError(f"{config_uri} is not an export's config: {exc}") from None
    if patch and image_size % int(patch):
        raise ImageSizeError(f"image_size {image_size} is not a multiple of the patch size {patch} of embedder {spec}")


def build_embedder(spec: str, image_size: int = 224, storage=None) -> Embedder:
    """``builtin``; ``arch:NAME`` (a randomly initialised models/ backbone, for tests and
    benchmarks: the same weights in every actor and attempt, from a seed of the name); or a
    path to a vfm export, an HF DINOv3 folder or an official DINOv3 checkpoint (anything
    ``models.weights.load_backbone`` reads), local or on the S3 store of ``storage``."""
    if spec == "builtin":
        return GradientHistogramEmbedder()
    if spec.startswith("arch:"):
        import torch

        from models import build_backbone

        # One network: embedding actors, resumed attempts and the seed images must not each draw their own.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):  # the caller's RNGs kept
            torch.manual_seed(int.from_bytes(hashlib.sha256(spec.encode()).digest()[:8], "little"))
            backbone = build_backbone(spec[len("arch:"):])
        return BackboneEmbedder(backbone, image_size, name=spec)
    from models.weights import load_backbone

    backbone, _info = load_backbone(spec, storage)  # storage: the run's S3 settings, for an s3:// checkpoint
    return BackboneEmbedder(backbone, image_size, name=spec)
