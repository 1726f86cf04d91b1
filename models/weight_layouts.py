"""Key-by-key translation between vfm's backbone state dict and the two public layouts: the official
facebookresearch/dinov3 checkpoints and HF transformers' DINOv3ViTModel. Pure functions on tensor dicts."""
import re
from typing import Any

import torch

from models.vision_transformer import ViTSpec

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line naming the problem."""


def describe_key_problems(name: str, problems: dict[str, list[str]], limit: int = 8) -> str:
    """One line: "NAME: missing keys: a, b; unexpected keys: c (+3 more)" for the non-empty lists."""
    parts = [
        f"{label}: {', '.join(keys[:limit])}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
        for label, keys in problems.items()
        if keys
    ]
    return f"{name}: " + "; ".join(parts)


class _Source:
    """A source state dict read key by key: what is asked for but absent is missing, what is never asked for is
    unexpected; both are reported together at the end."""

    def __init__(self, state: StateDict, name: str) -> None:
        self.state, self.name = state, name
        self.used: set[str] = set()
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            self.missing.append(key)
            return torch.empty(0)
        self.used.add(key)
        return self.state[key]

    def take_if_present(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.state else None

    def check(self) -> None:
        unexpected = sorted(set(self.state) - self.used)
        if self.missing or unexpected:
            raise CheckpointError(
                describe_key_problems(self.name, {"missing keys": self.missing, "unexpected keys": unexpected})
            )


def _block_indices(state: StateDict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


def _split_qkv_bias(bias: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if bias is None:
        return None, None
    q_bias, _k_bias_cancels_in_softmax, v_bias = bias.chunk(3)
    return q_bias, v_bias


def _put_qkv_bias(out: StateDict, prefix: str, q_bias: torch.Tensor | None, v_bias: torch.Tensor | None) -> None:
    if q_bias is None and v_bias is None:
        return
    # A model with only one of the q / v biases is the same model with the other one at zero.
    out[f"{prefix}.q_bias"] = q_bias if q_bias is not None else torch.zeros_like(v_bias)
    out[f"{prefix}.v_bias"] = v_bias if v_bias is not None else torch.zeros_like(q_bias)


def _ffn_names(ffn: str) -> list[tuple[str, str]]:
    """(vfm name, dinov3 name) pairs; vfm uses the dinov3 names for FFN layers."""
    return [("fc1", "fc1"), ("fc2", "fc2")] if ffn == "mlp" else [("w1", "w1"), ("w2", "w2"), ("w3", "w3")]


# ---------------------------------------------------------------- facebookresearch/dinov3


def from_dinov3(state: StateDict, name: str) -> tuple[ViTSpec, StateDict]:
    src = _Source(state, name)
    if not src.has("patch_embed.proj.weight"):
        raise CheckpointError(f"{name}: no patch_embed.proj.weight, not a DINOv3 backbone state dict")
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape
    depth = len(_block_indices(state, r"blocks\.(\d+)\."))
    if not src.has("rope_embed.periods"):
        raise CheckpointError(f"{name}: no rope_embed.periods, cannot tell the number of heads")
    periods = src.take("rope_embed.periods").float()
    head_dim = 4 * periods.numel()
    # periods[k] = base ** (k / n) for k < n.
    n = periods.numel()
    base = float(periods[-1] ** (n / (n - 1))) if n > 1 else 100.0
    expected = base ** (torch.arange(n, dtype=torch.float32) / n)
    if not torch.allclose(periods, expected, rtol=1e-3):
        raise CheckpointError(f"{name}: rope_embed.periods do not follow base**(k/{n}); only `base` RoPE is supported")
    swiglu = src.has("blocks.0.mlp.w1.weight")
    hidden = state["blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    spec = ViTSpec(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        ffn="swiglu" if swiglu else "mlp",
        ffn_hidden_dim=hidden,
        n_storage_tokens=state["storage_tokens"].shape[1] if "storage_tokens" in state else 0,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        proj_bias="blocks.0.attn.proj.bias" in state,
        ffn_bias=f"blocks.0.mlp.{'w1' if swiglu else 'fc1'}.bias" in state,
        untie_local_norm="local_cls_norm.weight" in state,
        in_chans=in_chans,
        rope_base=round(base, 4),
    )
    out: StateDict = {
        "patch_embed.weight": src.take("patch_embed.proj.weight"),
        "patch_embed.bias": src.take("patch_embed.proj.bias"),
        "cls_token": src.take("cls_token"),
        "storage_tokens": src.take("storage_tokens") if spec.n_storage_tokens else torch.zeros(1, 0, embed_dim),
        "mask_token": src.take("mask_token").reshape(1, embed_dim),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            out[f"{b}.{norm}.weight"], out[f"{b}.{norm}.bias"] = src.take(f"{b}.{norm}.weight"), src.take(f"{b}.{norm}.bias")
        out[f"{b}.attn.qkv.weight"] = src.take(f"{b}.attn.qkv.weight")
        src.take_if_present(f"{b}.attn.qkv.bias_mask")  # masks the key bias, which vfm drops
        _put_qkv_bias(out, f"{b}.attn.qkv", *_split_qkv_bias(src.take_if_present(f"{b}.attn.qkv.bias")))
        out[f"{b}.attn.proj.weight"] = src.take(f"{b}.attn.proj.weight")
        if spec.proj_bias:
            out[f"{b}.attn.proj.bias"] = src.take(f"{b}.attn.proj.bias")
        out[f"{b}.ls1.gamma"], out[f"{b}.ls2.gamma"] = src.take(f"{b}.ls1.gamma"), src.take(f"{b}.ls2.gamma")
        for ours, theirs in _ffn_names(spec.ffn):
            out[f"{b}.mlp.{ours}.weight"] = src.take(f"{b}.mlp.{theirs}.weight")
            if spec.ffn_bias:
                out[f"{b}.mlp.{ours}.bias"] = src.take(f"{b}.mlp.{theirs}.bias")
    for norm in ("norm", "local_cls_norm") if spec.untie_local_norm else ("norm",):
        out[f"{norm}.weight"], out[f"{norm}.bias"] = src.take(f"{norm}.weight"), src.take(f"{norm}.bias")
    src.check()
    return spec, out


def to_dinov3(state: StateDict, spec: ViTSpec) -> StateDict:
    dim = spec.embed_dim
    n_periods = spec.embed_dim // spec.num_heads // 4
    out: StateDict = {
        "patch_embed.proj.weight": state["patch_embed.weight"],
        "patch_embed.proj.bias": state["patch_embed.bias"],
        "cls_token": state["cls_token"],
        "mask_token": state["mask_token"].reshape(1, dim),
        "rope_embed.periods": spec.rope_base ** (torch.arange(n_periods, dtype=torch.float32) / n_periods),
    }
    if spec.n_storage_tokens:
        out["storage_tokens"] = state["storage_tokens"]
    for i in range(spec.depth):
        b = f"blocks.{i}"
        for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.proj.weight",
                    "ls1.gamma", "ls2.gamma"):
            out[f"{b}.{key}"] = state[f"{b}.{key}"]
        if spec.proj_bias:
            out[f"{b}.attn.proj.bias"] = state[f"{b}.attn.proj.bias"]
        if spec.qkv_bias:
            q_bias = state[f"{b}.attn.qkv.q_bias"]
            out[f"{b}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), state[f"{b}.attn.qkv.v_bias"]])
            out[f"{b}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]).to(q_bias.dtype)
        for ours, theirs in _ffn_names(spec.ffn):
            out[f"{b}.mlp.{theirs}.weight"] = state[f"{b}.mlp.{ours}.weight"]
            if spec.ffn_bias:
                out[f"{b}.mlp.{theirs}.bias"] = state[f"{b}.mlp.{ours}.bias"]
    for norm in ("norm", "local_cls_norm") if spec.untie_local_norm else ("norm",):
        out[f"{norm}.weight"], out[f"{norm}.bias"] = state[f"{norm}.weight"], state[f"{norm}.bias"]
    return out


# ---------------------------------------------------------------- HF transformers DINOv3ViTModel

_HF_FFN = {"mlp": [("fc1", "up_proj"), ("fc2", "down_proj")],
           "swiglu": [("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")]}


def from_hf(config: dict[str, Any], state: StateDict, name: str) -> tuple[ViTSpec, StateDict]:
    gated = bool(config.get("use_gated_mlp", False))
    spec = ViTSpec(
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["hidden_size"]),
        depth=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        ffn="swiglu" if gated else "mlp",
        ffn_hidden_dim=int(config["intermediate_size"]),
        n_storage_tokens=int(config.get("num_register_tokens", 0)),
        qkv_bias=bool(config.get("query_bias", True) or config.get("value_bias", True)),
        proj_bias=bool(config.get("proj_bias", True)),
        ffn_bias=bool(config.get("mlp_bias", True)),
        layerscale_init=float(config.get("layerscale_value", 1.0)),
        norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        in_chans=int(config.get("num_channels", 3)),
        rope_base=float(config.get("rope_theta", 100.0)),
        rope_shift=config.get("pos_embed_shift"),
        rope_jitter=config.get("pos_embed_jitter"),
        rope_rescale=config.get("pos_embed_rescale"),
    )
    expected_act = "silu" if gated else "gelu"
    if config.get("hidden_act", expected_act) != expected_act:
        raise CheckpointError(f"{name}: hidden_act {config['hidden_act']!r} is not supported (vfm uses {expected_act})")
    # Older exports put the blocks under "layer.N", transformers >= 5 under "model.layer.N".
    layer_prefix = "model.layer" if any(k.startswith("model.layer.") for k in state) else "layer"
    src = _Source(state, name)
    dim = spec.embed_dim
    out: StateDict = {
        "patch_embed.weight": src.take("embeddings.patch_embeddings.weight"),
        "patch_embed.bias": src.take("embeddings.patch_embeddings.bias"),
        "cls_token": src.take("embeddings.cls_token"),
        "storage_tokens": src.take("embeddings.register_tokens") if spec.n_storage_tokens else torch.zeros(1, 0, dim),
        "mask_token": src.take("embeddings.mask_token").reshape(1, dim),
    }
    for i in range(spec.depth):
        theirs, ours = f"{layer_prefix}.{i}", f"blocks.{i}"
        for norm in ("norm1", "norm2"):
            out[f"{ours}.{norm}.weight"], out[f"{ours}.{norm}.bias"] = src.take(f"{theirs}.{norm}.weight"), src.take(f"{theirs}.{norm}.bias")
        attn = f"{theirs}.attention"
        out[f"{ours}.attn.qkv.weight"] = torch.cat(
            [src.take(f"{attn}.q_proj.weight"), src.take(f"{attn}.k_proj.weight"), src.take(f"{attn}.v_proj.weight")]
        )
        src.take_if_present(f"{attn}.k_proj.bias")  # cancels in the softmax
        _put_qkv_bias(out, f"{ours}.attn.qkv", src.take_if_present(f"{attn}.q_proj.bias"), src.take_if_present(f"{attn}.v_proj.bias"))
        out[f"{ours}.attn.proj.weight"] = src.take(f"{attn}.o_proj.weight")
        if spec.proj_bias:
            out[f"{ours}.attn.proj.bias"] = src.take(f"{attn}.o_proj.bias")
        out[f"{ours}.ls1.gamma"] = src.take(f"{theirs}.layer_scale1.lambda1")
        out[f"{ours}.ls2.gamma"] = src.take(f"{theirs}.layer_scale2.lambda1")
        for our_name, hf_name in _HF_FFN[spec.ffn]:
            out[f"{ours}.mlp.{our_name}.weight"] = src.take(f"{theirs}.mlp.{hf_name}.weight")
            if spec.ffn_bias:
                out[f"{ours}.mlp.{our_name}.bias"] = src.take(f"{theirs}.mlp.{hf_name}.bias")
    out["norm.weight"], out["norm.bias"] = src.take("norm.weight"), src.take("norm.bias")
    src.check()
    return spec, out


def to_hf(state: StateDict, spec: ViTSpec) -> tuple[dict[str, Any], StateDict]:
    """HF config.json content and state dict. Blocks go under "layer.N" as in the public hub checkpoints (newer
    transformers renames them on load). The untied local-crop norm is a training-only part HF has no place for."""
    dim = spec.embed_dim
    config = {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "intermediate_size": spec.ffn_hidden_dim,
        "use_gated_mlp": spec.ffn == "swiglu",
        "hidden_act": "silu" if spec.ffn == "swiglu" else "gelu",
        "num_register_tokens": spec.n_storage_tokens,
        "patch_size": spec.patch_size,
        "num_channels": spec.in_chans,
        "image_size": 224,
        "layer_norm_eps": spec.norm_eps,
        "layerscale_value": spec.layerscale_init,
        "rope_theta": spec.rope_base,
        "pos_embed_shift": spec.rope_shift,
        "pos_embed_jitter": spec.rope_jitter,
        "pos_embed_rescale": spec.rope_rescale,
        "query_bias": spec.qkv_bias,
        "key_bias": False,
        "value_bias": spec.qkv_bias,
        "proj_bias": spec.proj_bias,
        "mlp_bias": spec.ffn_bias,
        "drop_path_rate": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    out: StateDict = {
        "embeddings.patch_embeddings.weight": state["patch_embed.weight"],
        "embeddings.patch_embeddings.bias": state["patch_embed.bias"],
        "embeddings.cls_token": state["cls_token"],
        "embeddings.register_tokens": state["storage_tokens"],
        "embeddings.mask_token": state["mask_token"].reshape(1, 1, dim),
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    for i in range(spec.depth):
        ours, theirs = f"blocks.{i}", f"layer.{i}"
        for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            out[f"{theirs}.{key}"] = state[f"{ours}.{key}"]
        q, k, v = state[f"{ours}.attn.qkv.weight"].chunk(3)
        attn = f"{theirs}.attention"
        out[f"{attn}.q_proj.weight"], out[f"{attn}.k_proj.weight"], out[f"{attn}.v_proj.weight"] = q, k, v
        if spec.qkv_bias:
            out[f"{attn}.q_proj.bias"] = state[f"{ours}.attn.qkv.q_bias"]
            out[f"{attn}.v_proj.bias"] = state[f"{ours}.attn.qkv.v_bias"]
        out[f"{attn}.o_proj.weight"] = state[f"{ours}.attn.proj.weight"]
        if spec.proj_bias:
            out[f"{attn}.o_proj.bias"] = state[f"{ours}.attn.proj.bias"]
        out[f"{theirs}.layer_scale1.lambda1"] = state[f"{ours}.ls1.gamma"]
        out[f"{theirs}.layer_scale2.lambda1"] = state[f"{ours}.ls2.gamma"]
        for our_name, hf_name in _HF_FFN[spec.ffn]:
            out[f"{theirs}.mlp.{hf_name}.weight"] = state[f"{ours}.mlp.{our_name}.weight"]
            if spec.ffn_bias:
                out[f"{theirs}.mlp.{hf_name}.bias"] = state[f"{ours}.mlp.{our_name}.bias"]
    return config, out
