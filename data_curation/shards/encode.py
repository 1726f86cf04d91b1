"""The image bytes a sample stores: the original when it can be, a re-encoding when it must.

The original bytes are kept when they are a JPEG, PNG or WebP and need no resize. Their
sha256 matched the manifest's, so they are the very bytes curation decoded and measured:
their signature and the manifest's width and height are enough here, and the writer pays
for no decode at all. Anything else (another format, or an image over the max side) is
decoded and encoded in the configured format, deterministically, so a rewritten shard has
the same bytes.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

_ENCODERS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png"), "webp": ("WEBP", "webp")}


class BadImage(ValueError):
    """The bytes could not be decoded as an image."""


@dataclass(frozen=True)
class EncodeOptions:
    """How images that cannot be kept as they are get re-encoded."""

    max_side: int | None = None  # longer side cap; larger images are downscaled
    format: str = "jpeg"  # jpeg | png | webp
    quality: int = 95  # jpeg/webp quality


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    extension: str
    width: int
    height: int
    reencoded: bool


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def kept_extension(data: bytes) -> str | None:
    """The member extension of a JPEG, PNG or WebP (the formats stored as they are), from its signature."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def stored_image(data: bytes, options: EncodeOptions, size: tuple[int, int] | None = None) -> StoredImage:
    """The bytes to store for an image whose source bytes are ``data`` and whose (width, height),
    when known from the manifest, is ``size``."""
    extension = kept_extension(data)
    if extension and size and _fit(*size, options.max_side) == size:
        return StoredImage(data, extension, size[0], size[1], reencoded=False)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            target = _fit(width, height, options.max_side)
            if extension and target == (width, height):
                return StoredImage(data, extension, width, height, reencoded=False)
            image = probe.convert("RGBA" if "A" in probe.getbands() else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImage(str(exc) or type(exc).__name__) from exc
    if image.size != target:
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    pil_format, extension = _ENCODERS[options.format]
    if pil_format == "JPEG" and image.mode == "RGBA":
        image = image.convert("RGB")
    out = io.BytesIO()
    params = {"quality": options.quality} if pil_format in ("JPEG", "WEBP") else {"optimize": False}
    image.save(out, format=pil_format, **params)
    return StoredImage(out.getvalue(), extension, target[0], target[1], reencoded=True)
