"""Decode image bytes into RGB uint8 arrays without ever raising on bad data.

Every input ends as either an accepted RGB image or a reject reason, so one bad file
never stops a curation run. Reasons (they go to the manifest as ``reject_reason``):

- ``empty``: zero bytes
- ``not_an_image``: Pillow cannot identify the format (text with a .jpg name, ...)
- ``truncated``: the header parses but the pixel data ends early or is cut (or, for a
  WebP, the file is shorter than its RIFF header says)
- ``corrupt``: any other failure while decoding pixels
- ``too_many_pixels``: width x height above the configured limit (decompression bombs);
  checked from the header, before any pixel is decoded
- ``too_small``: the shorter side is below the configured minimum
- ``extreme_aspect``: long side / short side above the configured maximum
- ``embedding_not_finite``: decoded, but the embedder gave it NaN or infinite values (set by
  ``scan.embed_rows``, not here: k-means and faiss refuse such a vector)

Accepted oddities are normalised instead: EXIF orientation is applied, CMYK and 16-bit
images are converted, transparency (RGBA, LA, palette with a transparent index) is
composited on white, and animated images keep their first frame.

Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is raised to the
configured ``max_pixels`` where that is higher, so that the configured limit decides.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REJECT_REASONS = ("unreadable", "empty", "not_an_image", "truncated", "corrupt",
                  "too_many_pixels", "too_small", "extreme_aspect", "embedding_not_finite")


@dataclass(frozen=True)
class DecodeLimits:
    """What an accepted image must satisfy."""

    max_pixels: int = 50_000_000
    min_side: int = 8
    max_aspect: float = 10.0


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one file: ``image`` (H, W, 3) uint8 when accepted, else ``reason``."""

    image: np.ndarray | None
    width: int | None
    height: int | None
    reason: str | None


def _reject(reason: str, width: int | None = None, height: int | None = None) -> Decoded:
    return Decoded(None, width, height, reason)


def _geometry_reason(width: int, height: int, limits: DecodeLimits) -> str | None:
    if width * height > limits.max_pixels:
        return "too_many_pixels"
    if min(width, height) < limits.min_side:
        return "too_small"
    if max(width, height) / max(min(width, height), 1) > limits.max_aspect:
        return "extreme_aspect"
    return None


def _high_bit_depth_to_rgb(img: Image.Image) -> np.ndarray:
    """16-bit and 32-bit grey ("I;16", "I", "F") scaled to 0..255 by the type's range."""
    arr = np.asarray(img)
    if img.mode == "F":
        top = float(arr.max()) if arr.size and float(arr.max()) > 1.0 else 1.0
    else:
        top = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
    grey = np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(img)
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # a transparent index or colour (tRNS)
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> Decoded:
    """Decode ``data`` to an RGB image or a reject reason; never raises on bad bytes."""
    if len(data) == 0:
        return _reject("empty")
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow raises past 2x this: never below our limit
    with warnings.catch_warnings():
        # Pillow warns (and past 2x its own limit raises) on huge images; our limit decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return _reject("too_many_pixels")
        except (UnidentifiedImageError, ValueError, TypeError, SyntaxError):
            return _reject("not_an_image")
        except OSError as exc:
            cut = "truncat" in str(exc).lower() or _riff_cut(data)
            return _reject("truncated" if cut else "not_an_image")
        # Width/height as displayed: EXIF orientations 5-8 swap the sides.
        width, height = img.size
        if _exif_orientation(img) in (5, 6, 7, 8):
            width, height = height, width
        if (reason := _geometry_reason(width, height, limits)) is not None:
            return _reject(reason, width, height)
        try:
            img.seek(0)  # animated formats: the first frame
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
        except Image.DecompressionBombError:
            return _reject("too_many_pixels", width, height)
        except (OSError, SyntaxError, EOFError) as exc:
            text = str(exc).lower()
            cut = any(word in text for word in ("truncat", "broken", "end of file", "eof", "premature"))
            return _reject("truncated" if cut or isinstance(exc, EOFError) else "corrupt", width, height)
        except Exception:  # a decoder plug-in failing in its own way is still just a bad file
            return _reject("corrupt", width, height)
    return Decoded(rgb, int(rgb.shape[1]), int(rgb.shape[0]), None)


def _riff_cut(data: bytes) -> bool:
    """A RIFF file (WebP) shorter than the size its header declares: Pillow decodes a WebP
    whole while opening it, and says only "could not create decoder object" when it is cut."""
    return len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP" \
        and int.from_bytes(data[4:8], "little") + 8 > len(data)


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF is ignored, as exif_transpose would
        return 1
