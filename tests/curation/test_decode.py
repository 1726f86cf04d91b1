import numpy as np
import pytest

from data_curation.decode import DecodeLimits, decode_image
from tests.curation.images import bad_files, odd_files

LIMITS = DecodeLimits(max_pixels=5_000_000, min_side=8, max_aspect=10.0)


@pytest.mark.parametrize("reason", sorted(bad_files()))
def test_each_bad_kind_is_rejected_with_its_reason(reason):
    _ext, data = bad_files()[reason]
    decoded = decode_image(data, LIMITS)
    assert decoded.image is None
    assert decoded.reason == reason


def test_geometry_rejects_report_the_size_from_the_header():
    decoded = decode_image(bad_files()["too_many_pixels"][1], LIMITS)
    assert (decoded.width, decoded.height) == (4000, 3000)


@pytest.mark.parametrize("kind", sorted(odd_files()))
def test_odd_images_are_accepted_as_rgb_uint8(kind):
    decoded = decode_image(odd_files()[kind][1], LIMITS)
    assert decoded.reason is None
    assert decoded.image.dtype == np.uint8 and decoded.image.ndim == 3 and decoded.image.shape[2] == 3
    assert decoded.image.shape[:2] == (decoded.height, decoded.width)


def test_exif_rotation_is_applied():
    decoded = decode_image(odd_files()["exif_rotated"][1], LIMITS)
    assert (decoded.width, decoded.height) == (40, 64)


def test_sixteen_bit_uses_the_full_range():
    image = decode_image(odd_files()["16bit"][1], LIMITS).image
    assert image.min() == 0 and image.max() == 255


def test_animated_gif_keeps_the_first_frame():
    image = decode_image(odd_files()["animated_gif"][1], LIMITS).image
    assert image.mean() < 50  # frame 0 is dark, frame 1 light


def test_transparency_is_composited_on_white():
    from PIL import Image

    from tests.curation.images import encode

    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert decode_image(encode(clear, "PNG"), LIMITS).image.min() == 255


def test_a_cut_webp_is_truncated():
    from tests.curation.images import encode, rgb

    webp = encode(rgb(40, 48), "WEBP")
    for cut in (len(webp) // 4, len(webp) // 2, len(webp) - 3):
        assert decode_image(webp[:cut], LIMITS).reason == "truncated"
    assert decode_image(webp, LIMITS).reason is None


@pytest.mark.parametrize("mode, clear", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparent_colour_is_composited_on_white(mode, clear):
    from PIL import Image

    from tests.curation.images import encode

    data = encode(Image.new(mode, (16, 16), clear), "PNG", transparency=clear)  # a tRNS chunk, no alpha channel
    assert decode_image(data, LIMITS).image.min() == 255


def test_the_configured_pixel_limit_decides_above_pillows_own(monkeypatch):
    from PIL import Image

    from tests.curation.images import encode

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 2  # past the size where Pillow itself raises
    data = encode(Image.new("1", (side, side)), "PNG")
    decoded = decode_image(data, DecodeLimits(max_pixels=side * side - 1))
    # rejected by the configured limit, from the header, with the size (Pillow's error has none)
    assert (decoded.reason, decoded.width, decoded.height) == ("too_many_pixels", side, side)
