"""PCA patch maps and augmented copies: real images of the expected size and content."""
import numpy as np
from PIL import Image

from models.evaluation.copies import make_copies
from models.evaluation.pca_maps import pca_rgb, save_pca_grid


def test_pca_grid_is_a_png_of_the_expected_size_with_structure(tmp_path):
    rng = np.random.default_rng(0)
    # left half of every image has one feature direction, right half another: the first
    # component must split them, so the map is not one flat colour
    grid = rng.normal(scale=0.1, size=(3, 4, 4, 16))
    grid[:, :, :2, 0] += 5
    rgb = pca_rgb(grid)
    assert rgb.shape == (3, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert np.abs(rgb[:, :, :2].mean(axis=(0, 1, 2)) - rgb[:, :, 2:].mean(axis=(0, 1, 2))).max() > 0.5
    images = [rng.integers(0, 256, size=(28, 28), dtype=np.uint8),
              rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8),
              rng.integers(0, 256, size=(8, 8), dtype=np.uint8)]
    path = save_pca_grid(images, rgb, tmp_path / "pca.png", cell=64)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (3 * 64, 2 * 64) and png.mode == "RGB"
        pixels = np.asarray(png)
    assert pixels[64:].std() > 10  # the map row is not blank


def test_copies_keep_shape_differ_from_source_and_are_seeded():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32), dtype=np.uint8),
              rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)]
    copies = make_copies(images, seed=1)
    assert [c.shape for c in copies] == [i.shape for i in images]
    assert all(c.dtype == np.uint8 for c in copies)
    assert any(not np.array_equal(c, i) for c, i in zip(copies, images, strict=True))
    again = make_copies(images, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(copies, again, strict=True))
