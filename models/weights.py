"""Load and export backbone weights: vfm's own export folder, HF transformers' DINOv3ViTModel folder, and the
official facebookresearch/dinov3 checkpoint files. Only safetensors or weights-only torch.load: never pickle."""
import io
import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import safetensors.torch
import torch

from data_curation.storage import Storage
from models.registry import build_from_spec
from models.vision_transformer import DinoVisionTransformer, ViTSpec
from models.weight_layouts import (
    CheckpointError,
    StateDict,
    describe_key_problems,
    from_dinov3,
    from_hf,
    to_dinov3,
    to_hf,
)

__all__ = ["CheckpointError", "export_backbone", "load_backbone", "load_state_dict_file"]

VFM_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
DINOV3_FILE = "model.pth"
ExportFormat = Literal["vfm", "hf", "dinov3"]
T = TypeVar("T")


def _backbone_part(state: Any) -> Any:
    """The teacher backbone of a DINOv2/DINOv3 training or evaluation checkpoint, as a plain backbone state
    dict: ``{"teacher": {"backbone.*", "dino_head.*", ...}}`` (the eval-time teacher checkpoint) or
    ``{"model": {"teacher.backbone.*", "student.*", ...}, "optimizer": ..., "iteration": ...}``. Anything
    else comes back as it is."""
    if isinstance(state, dict):
        for wrapper in ("teacher", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        for prefix in ("teacher.backbone.", "backbone."):
            if any(isinstance(k, str) and k.startswith(prefix) for k in state):
                return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_state_dict_file(path: str, storage: Storage | None = None) -> StateDict:
    """A tensor dict from a .safetensors file, or from a torch file that loads with weights_only=True
    (a training checkpoint gives its teacher backbone: see :func:`_backbone_part`)."""
    storage = storage or Storage()
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    data = storage.read_bytes(path)
    if path.endswith(".safetensors"):
        try:
            return _backbone_part(safetensors.torch.load(data))
        except Exception as exc:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler fails with many types (UnpicklingError, KeyError, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: neither safetensors nor a weights-only torch checkpoint; refusing to unpickle it ({first_line})"
        ) from exc
    state = _backbone_part(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a flat dict of tensors")
    return state


def _parsed(make: Callable[[], T], name: str) -> T:
    """Run an architecture-reading step, turning a bad field into a one-line CheckpointError."""
    try:
        return make()
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: cannot infer the architecture ({type(exc).__name__}: {exc})") from exc


def _into_backbone(spec: ViTSpec, state: StateDict, name: str) -> DinoVisionTransformer:
    """A backbone of `spec` holding exactly `state`: every key present, none extra, every shape equal."""
    backbone = build_from_spec(spec)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        problems = {"missing keys": missing, "unexpected keys": unexpected, "mis-shaped keys": misshaped}
        raise CheckpointError(describe_key_problems(name, problems))
    backbone.load_state_dict({k: v.float() for k, v in state.items()})
    return backbone


def load_backbone(path: str, storage: Storage | None = None) -> tuple[DinoVisionTransformer, dict[str, Any]]:
    """Detects the format: a folder with config.json ("format": "vfm" -> vfm export; "model_type": "dinov3_vit" ->
    HF DINOv3ViTModel) and model.safetensors, or a single official DINOv3 file (.pth or .safetensors).
    Returns the backbone in eval mode and info {"format", "path", "arch_spec"}."""
    storage = storage or Storage()
    if not storage.exists(path):
        raise CheckpointError(f"{path}: does not exist")
    if storage.isdir(path):
        config_path = storage.join(path, "config.json")
        if not storage.exists(config_path):
            raise CheckpointError(f"{path}: a folder without config.json is not a vfm or HF export")
        config = storage.read_json(config_path)
        state = load_state_dict_file(storage.join(path, WEIGHTS_FILE), storage)
        if config.get("format") == "vfm":
            spec = _parsed(lambda: ViTSpec(**config.get("arch_spec", {})), config_path)
            fmt = "vfm"
        elif config.get("model_type") == "dinov3_vit":
            spec, state = _parsed(lambda: from_hf(config, state, path), path)
            fmt = "hf"
        else:
            raise CheckpointError(f"{config_path}: neither a vfm export (format: vfm) nor a DINOv3ViTModel config")
    else:
        state = load_state_dict_file(path, storage)
        if "patch_embed.proj.weight" not in state:
            raise CheckpointError(f"{path}: not an official DINOv3 backbone state dict (no patch_embed.proj.weight)")
        spec, state = _parsed(lambda: from_dinov3(state, path), path)
        fmt = "dinov3"
    backbone = _into_backbone(spec, state, path)
    return backbone.eval(), {"format": fmt, "path": path, "arch_spec": spec.to_dict()}


def export_backbone(
    backbone: DinoVisionTransformer, out_dir: str, fmt: ExportFormat = "vfm", storage: Storage | None = None
) -> list[str]:
    """Write the backbone to out_dir (each file written atomically); returns the files written.
    vfm: config.json + model.safetensors; hf: config.json + model.safetensors for DINOv3ViTModel.from_pretrained
    (the untied local-crop norm, used only in training, is left out); dinov3: model.pth in the official layout."""
    storage = storage or Storage()
    spec = backbone.spec
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    storage.makedirs(out_dir)
    if fmt == "vfm":
        config = {"format": "vfm", "format_version": VFM_FORMAT_VERSION, "arch_spec": spec.to_dict()}
        weights = state
    elif fmt == "hf":
        config, weights = to_hf(state, spec)
    elif fmt == "dinov3":
        buffer = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in to_dinov3(state, spec).items()}, buffer)
        target = storage.join(out_dir, DINOV3_FILE)
        storage.write_bytes(target, buffer.getvalue())
        return [target]
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose vfm, hf or dinov3")
    weights_path = storage.join(out_dir, WEIGHTS_FILE)
    config_path = storage.join(out_dir, "config.json")
    weights = {k: v.contiguous() for k, v in weights.items()}
    storage.write_bytes(weights_path, safetensors.torch.save(weights, metadata={"format": "pt"}))
    storage.write_text(config_path, json.dumps(config, indent=2))
    return [weights_path, config_path]
