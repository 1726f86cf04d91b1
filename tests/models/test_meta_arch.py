"""Student, EMA teacher and Gram teacher: one call from a batch of crops to the named losses."""
import pytest
import torch

from models import HEADS, backbone_spec
from models.meta_arch import CropBatch, LossWeights, SSLMetaArch


@pytest.fixture
def meta() -> SSLMetaArch:
    return SSLMetaArch(backbone_spec("vit_test", drop_path=0.1), *HEADS["vit_test"]).train()


def _batch(with_masks: bool = True) -> CropBatch:
    masks = torch.zeros(2, 3, 16, dtype=torch.bool)
    if with_masks:
        masks[0, :2, :5] = True  # half of the global-crop images carry masks, as in iBOT
    return CropBatch(
        global_crops=torch.randn(2, 3, 3, 32, 32),
        local_crops=torch.randn(4, 3, 3, 16, 16),
        masks=masks,
        gram_crops=torch.randn(2, 3, 3, 64, 64),  # the Gram teacher's 2x view
    )


def test_teacher_starts_as_the_student_and_ema_momentum_limits(meta: SSLMetaArch) -> None:
    for s, t in zip(meta.student.parameters(), meta.teacher.parameters(), strict=True):
        torch.testing.assert_close(s, t, rtol=0, atol=0)
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in meta.teacher.parameters()]
    meta.update_teacher(momentum=1.0)
    for b, t in zip(before, meta.teacher.parameters(), strict=True):
        torch.testing.assert_close(t, b, rtol=0, atol=0)
    meta.update_teacher(momentum=0.0)
    for s, t in zip(meta.student.parameters(), meta.teacher.parameters(), strict=True):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    meta.update_teacher(momentum=0.5)  # already equal: stays equal
    for s, t in zip(meta.student.parameters(), meta.teacher.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def test_losses_and_gradients_reach_the_student_only(meta: SSLMetaArch) -> None:
    meta.refresh_gram_teacher()
    losses = meta(_batch(), teacher_temperature=0.04, gram_weight=1.0)
    assert set(losses) == {"dino_local", "dino_global", "koleo", "ibot", "gram", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert all(p.grad is not None for p in meta.student["dino_head"].parameters())
    assert all(p.grad is not None for p in meta.student["ibot_head"].parameters())
    assert meta.student["backbone"].blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in meta.teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in meta.gram_teacher.parameters())


def test_total_is_the_weighted_sum_with_the_gram_phase_local_weight(meta: SSLMetaArch) -> None:
    weights = LossWeights()
    meta.refresh_gram_teacher()
    meta.eval()  # no drop path / RoPE augmentation, so both calls see the same network
    batch = _batch()
    plain = meta(batch, teacher_temperature=0.05)
    assert "gram" not in plain
    # 2 global + 4 local crops: 8 local pairs and 2 global pairs out of 10.
    expected = 0.8 * plain["dino_local"] + 0.2 * plain["dino_global"] + weights.koleo * plain["koleo"] + weights.ibot * plain["ibot"]
    torch.testing.assert_close(plain["total"], expected)
    gram = meta(batch, teacher_temperature=0.05, gram_weight=2.0)
    expected = (0.8 * weights.dino_local_in_gram_phase * gram["dino_local"] + 0.2 * gram["dino_global"]
                + weights.koleo * gram["koleo"] + weights.ibot * gram["ibot"] + 2.0 * gram["gram"])
    torch.testing.assert_close(gram["total"], expected)


def test_gram_teacher_is_a_frozen_snapshot_refreshed_on_request(meta: SSLMetaArch) -> None:
    with pytest.raises(RuntimeError, match="refresh_gram_teacher"):
        meta(_batch(), teacher_temperature=0.04, gram_weight=1.0)
    meta.refresh_gram_teacher()
    snapshot = [p.clone() for p in meta.gram_teacher.parameters()]
    with torch.no_grad():
        for p in meta.student.parameters():
            p.add_(1.0)
    meta.update_teacher(momentum=0.0)
    for s, g in zip(snapshot, meta.gram_teacher.parameters(), strict=True):
        torch.testing.assert_close(g, s, rtol=0, atol=0)
    meta.refresh_gram_teacher()
    for t, g in zip(meta.teacher["backbone"].parameters(), meta.gram_teacher.parameters(), strict=True):
        torch.testing.assert_close(g, t, rtol=0, atol=0)


def test_gram_teacher_on_the_global_crops_without_masks_or_locals(meta: SSLMetaArch) -> None:
    meta.refresh_gram_teacher()
    batch = _batch(with_masks=False)
    batch.local_crops = None
    batch.gram_crops = None
    losses = meta(batch, teacher_temperature=0.04, gram_weight=1.0)
    assert set(losses) == {"dino_global", "koleo", "ibot", "gram", "total"}
    assert losses["ibot"].item() == 0.0  # nothing masked: iBOT runs on no patch (and still joins all-reduces)
    # The Gram teacher equals the teacher, which equals the student at step 0: eval-mode features agree.
    meta.eval()
    assert meta(batch, teacher_temperature=0.04, gram_weight=1.0)["gram"].item() == pytest.approx(0.0, abs=1e-6)
