"""Feature extraction: mixed sizes and modes, order kept, batching does not change the features."""
import numpy as np
import torch

from models import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from models.evaluation.features import extract_features, extract_patch_grid, images_to_tensor, pixel_features


def mixed_images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8)
            for shape in [(28, 28), (40, 30, 3), (8, 8), (28, 28), (17, 50, 3)]]


def test_images_become_normalised_rgb_of_the_model_side():
    grey = np.full((10, 12), 255, dtype=np.uint8)
    x = images_to_tensor([grey, np.zeros((5, 5, 3), np.uint8)], side=16)
    assert x.shape == (2, 3, 16, 16)
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 8, 8], white, atol=1e-5)  # grey is repeated on the 3 channels
    assert pixel_features([grey], side=4).shape == (1, 48)


def test_mixed_images_give_finite_features_independent_of_batching():
    torch.manual_seed(0)
    backbone = build_backbone("vit_test")
    images = mixed_images()
    together = extract_features(backbone, images, resolution=20, batch_size=2, device="cpu")
    assert together.cls.shape == (5, backbone.embed_dim) and together.concatenated().shape == (5, 128)
    assert np.isfinite(together.concatenated()).all()
    alone = [extract_features(backbone, [im], resolution=20, device="cpu") for im in images]
    assert np.allclose(together.cls, np.concatenate([a.cls for a in alone]), atol=1e-5)
    assert np.allclose(together.patch_mean, np.concatenate([a.patch_mean for a in alone]), atol=1e-5)
    grid = extract_patch_grid(backbone, images[:2], resolution=20, device="cpu")
    assert grid.shape == (2, 3, 3, backbone.embed_dim)  # 20 px rounds to 24 = 3 patches of 8
