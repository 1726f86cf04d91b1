"""Import/export of backbone weights: HF transformers DINOv3ViTModel both ways, the official DINOv3 layout, and
the errors a user gets for a bad checkpoint."""
import io
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from models import build_backbone
from models.weights import CheckpointError, export_backbone, load_backbone

# Two resolutions, one of them not square; patch 8 (vit_test) and patch 16 (HF config below) both divide them.
RESOLUTIONS = [(32, 32), (48, 32)]


def _tiny_hf_model(gated: bool) -> DINOv3ViTModel:
    config = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_register_tokens=3,
        patch_size=16, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu", layerscale_value=0.5,
    )
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF inits biases and mask token to zero)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _hf_tokens(model: DINOv3ViTModel, images: torch.Tensor, n_register: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        hidden = model(pixel_values=images).last_hidden_state
    return {"cls": hidden[:, 0], "registers": hidden[:, 1 : 1 + n_register], "patches": hidden[:, 1 + n_register :]}


def _our_tokens(backbone, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = backbone.forward_features(images)
    return {"cls": out["x_norm_clstoken"], "registers": out["x_storage_tokens"], "patches": out["x_norm_patchtokens"]}


def _assert_same_tokens(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name in ("cls", "registers", "patches"):
        assert ours[name].shape == theirs[name].shape, name
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("gated", [False, True])
def test_import_from_transformers_matches_its_outputs(tmp_path: Path, gated: bool) -> None:
    hf = _tiny_hf_model(gated)
    hf.save_pretrained(tmp_path)
    backbone, info = load_backbone(str(tmp_path))
    assert info["format"] == "hf"
    assert backbone.spec.ffn == ("swiglu" if gated else "mlp")
    for height, width in RESOLUTIONS:
        images = torch.randn(2, 3, height, width)
        _assert_same_tokens(_our_tokens(backbone, images), _hf_tokens(hf, images, 3))


def test_export_to_transformers_loads_with_from_pretrained(tmp_path: Path) -> None:
    backbone = build_backbone("vit_test", ffn="swiglu", ffn_hidden_dim=96, layerscale_init=0.3)
    with torch.no_grad():
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    export_backbone(backbone, str(tmp_path), fmt="hf")
    hf = DINOv3ViTModel.from_pretrained(tmp_path).eval()
    for height, width in RESOLUTIONS:
        images = torch.randn(2, 3, height, width)
        _assert_same_tokens(_our_tokens(backbone, images), _hf_tokens(hf, images, backbone.n_storage_tokens))


@pytest.mark.parametrize("fmt", ["vfm", "dinov3"])
def test_export_then_load_gives_the_same_backbone(tmp_path: Path, fmt: str) -> None:
    backbone = build_backbone("vit_test")
    files = export_backbone(backbone, str(tmp_path / fmt), fmt=fmt)
    loaded, info = load_backbone(files[0] if fmt == "dinov3" else str(tmp_path / fmt))
    assert info["format"] == fmt
    assert loaded.spec == backbone.spec
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_official_layout_keys(tmp_path: Path) -> None:
    backbone = build_backbone("vit_test", ffn="swiglu", ffn_hidden_dim=96)
    (path,) = export_backbone(backbone, str(tmp_path), fmt="dinov3")
    state = torch.load(path, weights_only=True)
    assert {"patch_embed.proj.weight", "cls_token", "storage_tokens", "mask_token", "rope_embed.periods",
            "blocks.1.attn.qkv.bias_mask", "blocks.0.mlp.w3.weight", "local_cls_norm.weight", "norm.bias"} <= set(state)
    assert state["mask_token"].shape == (1, 64)
    assert state["rope_embed.periods"].tolist() == pytest.approx([100 ** (k / 4) for k in range(4)])
    # The official .safetensors variant of the same dict loads too.
    safetensors.torch.save_file(state, str(tmp_path / "official.safetensors"))
    assert load_backbone(str(tmp_path / "official.safetensors"))[1]["format"] == "dinov3"


def _official_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    (path,) = export_backbone(build_backbone("vit_test"), str(tmp_path / "src"), fmt="dinov3")
    return torch.load(path, weights_only=True)


def test_bad_state_dict_lists_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    state = _official_state(tmp_path)
    del state["blocks.0.ls1.gamma"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad_keys.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.ls1\.gamma.*unexpected keys: blocks\.0\.extra\.weight"):
        load_backbone(str(tmp_path / "bad_keys.pth"))

    state = _official_state(tmp_path)
    state["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: blocks\.1\.attn\.proj\.weight \(64, 32\) != \(64, 64\)"):
        load_backbone(str(tmp_path / "bad_shape.pth"))


def test_training_checkpoints_give_their_teacher_backbone(tmp_path: Path) -> None:
    """DINOv2/v3 checkpoints wrap the backbone: {"teacher": {"backbone.*", heads}} and {"model": {...}, ...}."""
    plain = _official_state(tmp_path)
    torch.save(plain, tmp_path / "plain.pth")
    reference = load_backbone(str(tmp_path / "plain.pth"))[0].state_dict()
    head = {"dino_head.mlp.0.weight": torch.zeros(8, 64), "ibot_head.last_layer.weight": torch.zeros(4, 8)}
    eval_checkpoint = {"teacher": {**{f"backbone.{k}": v for k, v in plain.items()}, **head}}
    training = {"model": {**{f"teacher.backbone.{k}": v for k, v in plain.items()},
                          **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in plain.items()}},
                "iteration": 1250, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}
    for name, checkpoint in (("teacher_checkpoint.pth", eval_checkpoint), ("model_0001249.pth", training)):
        torch.save(checkpoint, tmp_path / name)
        loaded, info = load_backbone(str(tmp_path / name))
        assert info["format"] == "dinov3"
        for key, value in reference.items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


class _NotTensors:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the deliberate plain pickle below
def test_refuses_pickles_and_non_checkpoints(tmp_path: Path) -> None:
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"patch_embed.proj.weight": _NotTensors()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_backbone(str(tmp_path / "evil.pth"))

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt: neither safetensors nor a weights-only"):
        load_backbone(str(tmp_path / "notes.txt"))

    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_backbone(str(tmp_path / "broken.safetensors"))

    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    (tmp_path / "other.pth").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not an official DINOv3 backbone"):
        load_backbone(str(tmp_path / "other.pth"))

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(tmp_path / "folder" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="neither a vfm export"):
        load_backbone(str(tmp_path / "folder"))

    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone(str(tmp_path / "nowhere"))
