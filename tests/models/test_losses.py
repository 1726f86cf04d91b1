"""Each loss on inputs small enough to compute by hand, and the shared Sinkhorn-Knopp."""
import math

import pytest
import torch

from models.losses import DINOLoss, GramLoss, IBOTLoss, KoLeoLoss, downsample_patch_features, sinkhorn_knopp


def test_sinkhorn_rows_are_distributions_and_prototypes_get_equal_mass() -> None:
    logits = torch.randn(12, 4)
    targets = sinkhorn_knopp(logits, temperature=0.5, n_iterations=3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(12))
    # Three iterations (the training setting) get close to uniform; many get there exactly.
    torch.testing.assert_close(targets.sum(dim=0), torch.full((4,), 12 / 4), atol=0.3, rtol=0)
    converged = sinkhorn_knopp(logits, temperature=0.5, n_iterations=100)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((4,), 3.0), atol=1e-4, rtol=0)


def test_sinkhorn_is_finite_for_large_logits_and_uniform_for_constant_ones() -> None:
    assert torch.isfinite(sinkhorn_knopp(torch.randn(8, 16) * 1e4, temperature=0.04)).all()
    torch.testing.assert_close(sinkhorn_knopp(torch.full((3, 5), 7.0), 0.1), torch.full((3, 5), 0.2))


def test_dino_loss_by_hand() -> None:
    loss = DINOLoss(student_temperature=1.0)
    # Student crop 0 is uniform over 2 prototypes, crop 1 puts 3/4 on prototype 0.
    student = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # (S=2, B=1, K=2)
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (T=2, B=1, K=2)
    all_pairs = (math.log(2) + math.log(2) - math.log(0.75) - math.log(0.25)) / 4
    assert loss(student, teacher).item() == pytest.approx(all_pairs, rel=1e-6)
    cross_pairs_only = (math.log(2) - math.log(0.75)) / 2
    assert loss(student, teacher, skip_same_crop=True).item() == pytest.approx(cross_pairs_only, rel=1e-6)


def test_dino_loss_needs_a_pair() -> None:
    with pytest.raises(ValueError, match="no crop pair"):
        DINOLoss()(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), skip_same_crop=True)


def test_ibot_loss_averages_per_image_then_over_masked_images() -> None:
    loss = IBOTLoss(student_temperature=1.0)
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    # Masked patches in masks.nonzero() order: image 0 (two), image 2 (one).
    student = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    image0 = (math.log(2) + math.log(4)) / 2
    image2 = math.log(2)
    assert loss(student, teacher, masks).item() == pytest.approx((image0 + image2) / 2, rel=1e-6)


def test_koleo_by_hand_and_guarded_at_batch_one() -> None:
    points = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-3.0, 0.0]])  # normalised: three points on the unit circle
    assert KoLeoLoss()(points).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    single = torch.randn(1, 8, requires_grad=True)
    value = KoLeoLoss()(single)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(single.grad).all()


def test_gram_loss_zero_for_identical_features_positive_otherwise() -> None:
    features = torch.randn(2, 9, 16)
    gram = GramLoss()
    assert gram(features, features * 3.0).item() == pytest.approx(0.0, abs=1e-7)  # per-patch norm removes the scale
    assert gram(features, torch.randn(2, 9, 16)).item() > 0.0
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert gram(student, teacher).item() == pytest.approx(0.5)  # mean((I - ones)^2) over a 2x2 Gram


def test_downsample_patch_features_to_the_student_grid() -> None:
    constant = torch.ones(2, 8 * 6, 4) * torch.arange(4.0)
    out = downsample_patch_features(constant, (8, 6), (4, 3))
    assert out.shape == (2, 12, 4)
    torch.testing.assert_close(out, torch.ones(2, 12, 4) * torch.arange(4.0))
    with pytest.raises(ValueError, match="do not form a 5x5 grid"):
        downsample_patch_features(constant, (5, 5), (4, 3))
