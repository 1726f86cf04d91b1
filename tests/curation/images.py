"""Image files for curation tests: one of every bad or odd kind the decoder must survive."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> list[int]:
    """A tar of ``members`` (name -> bytes) in that order; returns each member's header offset."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [member.offset for member in tar.getmembers()]


def rgb(h: int = 40, w: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def bad_files() -> dict[str, tuple[str, bytes]]:
    """reason -> (file extension, bytes) for every kind the decoder rejects."""
    jpeg = encode(rgb(), "JPEG")
    return {
        "truncated": ("jpg", jpeg[: len(jpeg) // 2]),
        "empty": ("jpg", b""),
        "not_an_image": ("png", b"just some text, not pixels\n" * 8),
        "too_many_pixels": ("png", encode(Image.new("L", (4000, 3000)), "PNG")),
        "too_small": ("png", encode(rgb(4, 4), "PNG")),
        "extreme_aspect": ("png", encode(rgb(10, 200), "PNG")),
    }


def odd_files() -> dict[str, tuple[str, bytes]]:
    """kind -> (extension, bytes) for odd images the decoder must accept and normalise."""
    exif = rgb(40, 64).getexif()
    exif[0x0112] = 6  # rotate 90° when displayed: 64x40 stored, 40x64 shown
    palette = rgb().convert("P")
    frames = [Image.new("RGB", (32, 32), c) for c in ((10, 10, 10), (250, 250, 250))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16))
    return {
        "cmyk": ("jpg", encode(rgb().convert("CMYK"), "JPEG")),
        "16bit": ("png", encode(sixteen, "PNG")),
        "palette_transparency": ("png", encode(palette, "PNG", transparency=0)),
        "exif_rotated": ("jpg", encode(rgb(40, 64), "JPEG", exif=exif)),
        "animated_gif": ("gif", gif.getvalue()),
        "rgba": ("png", encode(rgb().convert("RGBA"), "PNG")),
        "avif": ("avif", encode(rgb(), "AVIF")),
        "jpeg2000": ("jp2", encode(rgb(), "JPEG2000")),
    }
