"""The DINOv3 ViT backbone: sizes, outputs, crops lists, masks, bad input, init."""
import pytest
import torch

from models import ARCHS, HEADS, backbone_spec, build_backbone, count_parameters
from models.heads import build_head
from models.registry import materialize
from models.vision_transformer import DinoVisionTransformer

# Counted by hand from each preset's dims (see REFERENCE.md §1 for the 7B breakdown).
EXPECTED_BACKBONE_PARAMETERS = {
    "vit_test": 112_960,
    "vit_small": 21_596_544,
    "vit_base": 85_660_416,
    "vit_large": 303_129_600,
    "vit_huge_plus": 840_592_640,
    "vit_7b": 6_716_043_264,
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_parameter_count_of_every_preset_on_meta(arch: str) -> None:
    backbone = build_backbone(arch, device="meta")
    assert all(p.is_meta for p in backbone.parameters())
    assert count_parameters(backbone) == EXPECTED_BACKBONE_PARAMETERS[arch]


def test_vit_7b_blocks_and_heads_match_the_reference_breakdown() -> None:
    backbone = build_backbone("vit_7b", device="meta")
    assert count_parameters(backbone.blocks[0]) == 167_821_312
    assert count_parameters(backbone.patch_embed) == 3_149_824
    dino, ibot = HEADS["vit_7b"]
    assert round(count_parameters(build_head(4096, dino, device="meta")) / 1e6, 1) == 239.1
    assert round(count_parameters(build_head(4096, ibot, device="meta")) / 1e6, 1) == 72.9


def test_forward_features_shapes_on_a_rectangular_image() -> None:
    backbone = build_backbone("vit_test")
    out = backbone.forward_features(torch.randn(2, 3, 32, 48))
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_storage_tokens"].shape == (2, 2, 64)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, 64)
    assert out["x_prenorm"].shape == (2, 1 + 2 + 24, 64)
    assert out["masks"] is None
    assert backbone(torch.randn(2, 3, 32, 48)).shape == (2, 64)


def test_a_list_of_crops_gives_the_same_as_separate_calls() -> None:
    backbone = build_backbone("vit_test")
    big, small = torch.randn(2, 3, 32, 32), torch.randn(5, 3, 16, 24)
    together = backbone.forward_features([big, small])
    for crops, out in zip((big, small), together, strict=True):
        alone = backbone.forward_features(crops)
        torch.testing.assert_close(out["x_norm_patchtokens"], alone["x_norm_patchtokens"], atol=1e-5, rtol=0)


def test_masked_patches_see_the_mask_token_only() -> None:
    backbone = build_backbone("vit_test")
    with torch.no_grad():
        backbone.mask_token.normal_()
    images = torch.randn(1, 3, 16, 16)
    masks = torch.tensor([[True, False, False, False]])
    other = images.clone()
    other[..., :8, :8] = torch.randn(1, 3, 8, 8)  # changes only the masked (first) patch
    a = backbone.forward_features(images, masks)
    b = backbone.forward_features(other, masks)
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"])
    assert not torch.allclose(backbone.forward_features(images)["x_prenorm"], backbone.forward_features(other)["x_prenorm"])


def test_untied_local_norm_applies_to_local_crops_in_training_only() -> None:
    backbone = build_backbone("vit_test")
    with torch.no_grad():
        backbone.local_cls_norm.weight.fill_(3.0)
    crops = torch.randn(2, 3, 16, 16)
    backbone.train()
    local, plain = backbone.forward_features([crops, crops], local_crops=[True, False])
    assert not torch.allclose(local["x_norm_clstoken"], plain["x_norm_clstoken"])
    torch.testing.assert_close(local["x_norm_patchtokens"], plain["x_norm_patchtokens"])
    backbone.eval()
    local, plain = backbone.forward_features([crops, crops], local_crops=[True, False])
    torch.testing.assert_close(local["x_norm_clstoken"], plain["x_norm_clstoken"])


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 30, 32), "image size 30x32 is not a multiple of the patch size 8"),
        ((2, 1, 32, 32), "expected 3 channels, got 1"),
        ((3, 32, 32), r"expected images of shape \(B, C, H, W\)"),
    ],
)
def test_bad_input_is_named(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone("vit_test").forward_features(torch.randn(*shape))


def test_unknown_arch_and_option_are_named() -> None:
    with pytest.raises(ValueError, match="unknown arch 'vit_tiny'"):
        build_backbone("vit_tiny")
    with pytest.raises(ValueError, match=r"unknown backbone option\(s\) \['dropout'\]"):
        build_backbone("vit_test", dropout=0.1)


def test_build_fills_nan_first_so_an_uninitialised_parameter_is_caught() -> None:
    backbone = build_backbone("vit_test")
    assert all(torch.isfinite(p).all() for p in backbone.parameters())
    model = DinoVisionTransformer(backbone_spec("vit_test"), device="meta")
    model.register_parameter("forgotten", torch.nn.Parameter(torch.empty(3, device="meta")))
    with pytest.raises(RuntimeError, match=r"parameters left uninitialised: \['forgotten'\]"):
        materialize(model)
    model.blocks[0].add_module("extra", torch.nn.Bilinear(2, 2, 2, device="meta"))
    with pytest.raises(TypeError, match="no init rule for Bilinear"):
        materialize(model)


def test_activation_checkpointing_and_drop_path_train() -> None:
    torch.manual_seed(1)
    plain = build_backbone("vit_test").train()
    checkpointed = build_backbone("vit_test", activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 16, 16)
    for model in (plain, checkpointed):
        model.rope.rescale = None  # deterministic coordinates so both runs see the same RoPE
        model.forward_features(images)["x_norm_clstoken"].square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)

    dropping = build_backbone("vit_test", drop_path=0.5).train()
    out = dropping.forward_features([torch.randn(4, 3, 16, 16), torch.randn(6, 3, 8, 8)])
    assert torch.isfinite(out[1]["x_norm_clstoken"]).all()
    out[0]["x_norm_clstoken"].sum().backward()
    assert dropping.blocks[0].mlp.fc1.weight.grad is not None
