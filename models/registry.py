"""Named backbone sizes and the one way to build a backbone: on the meta device, then NaN fill and explicit init,
or under deepspeed.zero.Init with the same init applied one partitioned module at a time."""
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from models.heads import HeadSpec
from models.layers import LayerScale, QKVProjection
from models.vision_transformer import DinoVisionTransformer, ViTSpec

ARCHS: dict[str, ViTSpec] = {
    # Tiny twin for tests and the CPU-only `local` preset; keeps every feature (storage tokens, untied norm).
    "vit_test": ViTSpec(
        patch_size=8, embed_dim=64, depth=2, num_heads=4, ffn="mlp", ffn_hidden_dim=256, n_storage_tokens=2,
        untie_local_norm=True,
    ),
    "vit_small": ViTSpec(patch_size=16, embed_dim=384, depth=12, num_heads=6, ffn="mlp", ffn_hidden_dim=1536),
    "vit_base": ViTSpec(patch_size=16, embed_dim=768, depth=12, num_heads=12, ffn="mlp", ffn_hidden_dim=3072),
    "vit_large": ViTSpec(patch_size=16, embed_dim=1024, depth=24, num_heads=16, ffn="mlp", ffn_hidden_dim=4096),
    # SwiGLU hidden = int(2/3 * 6 * 1280) = 5120.
    "vit_huge_plus": ViTSpec(
        patch_size=16, embed_dim=1280, depth=32, num_heads=20, ffn="swiglu", ffn_hidden_dim=5120
    ),
    # SwiGLU hidden = int(2/3 * 3 * 4096) rounded up to a multiple of 64 = 8192.
    "vit_7b": ViTSpec(
        patch_size=16, embed_dim=4096, depth=40, num_heads=32, ffn="swiglu", ffn_hidden_dim=8192,
        qkv_bias=False, drop_path=0.4, untie_local_norm=True,
    ),
}

_DEFAULT_HEAD = HeadSpec(hidden_dim=2048, bottleneck_dim=256, n_prototypes=65536)
# (DINO head, iBOT head) per arch.
HEADS: dict[str, tuple[HeadSpec, HeadSpec]] = {
    "vit_test": (HeadSpec(64, 32, 128), HeadSpec(64, 32, 128)),
    "vit_small": (_DEFAULT_HEAD, _DEFAULT_HEAD),
    "vit_base": (_DEFAULT_HEAD, _DEFAULT_HEAD),
    "vit_large": (_DEFAULT_HEAD, _DEFAULT_HEAD),
    "vit_huge_plus": (_DEFAULT_HEAD, _DEFAULT_HEAD),
    "vit_7b": (HeadSpec(8192, 512, 262144), HeadSpec(4096, 384, 98304)),
}


def backbone_spec(arch: str, **overrides: Any) -> ViTSpec:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    unknown = set(overrides) - set(ViTSpec.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown backbone option(s) {sorted(unknown)}; valid: {sorted(ViTSpec.__dataclass_fields__)}")
    return replace(ARCHS[arch], **overrides)


@torch.no_grad()
def init_own_parameters(module: nn.Module) -> None:
    """Initialise the parameters a module holds itself (not its children's)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, QKVProjection):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.q_bias is not None:
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)
    elif isinstance(module, nn.Conv2d):
        # PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = (module.in_channels * module.kernel_size[0] * module.kernel_size[1]) ** -0.5
        nn.init.uniform_(module.weight, -bound, bound)
        if module.bias is not None:
            nn.init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, (nn.LayerNorm, LayerScale)):
        module.reset_parameters()
    elif isinstance(module, DinoVisionTransformer):
        nn.init.normal_(module.cls_token, std=0.02)
        nn.init.normal_(module.storage_tokens, std=0.02)
        nn.init.zeros_(module.mask_token)
    elif any(True for _ in module.parameters(recurse=False)):
        raise TypeError(f"no init rule for {type(module).__name__}, which holds parameters")


def _modules_with_parameters(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a meta-device model on `device`, fill every parameter with NaN, initialise, and check that no
    NaN survived (a parameter that no init rule touched)."""
    model.to_empty(device=device)
    for param in model.parameters():
        param.fill_(float("nan"))
    for module in _modules_with_parameters(model):
        init_own_parameters(module)
    uninitialised = [name for name, p in model.named_parameters() if torch.isnan(p).any()]
    if uninitialised:
        raise RuntimeError(f"parameters left uninitialised: {uninitialised}")
    return model


@torch.no_grad()
def init_partitioned(model: nn.Module) -> nn.Module:
    """The same init for a model built under deepspeed.zero.Init: gather one module's own partitioned
    parameters at a time (never the whole model), initialise on rank 0, and let DeepSpeed re-partition.

    Give zero.Init the parameter dtype through its DeepSpeed config (``bf16``/``fp16`` enabled or
    neither, float32), not its ``dtype=`` argument: DeepSpeed 0.19.8 ignores that argument on an
    accelerator without fp16 support (a CPU without AVX512-FP16 or AMX-FP16) and builds bfloat16."""
    import deepspeed

    for module in _modules_with_parameters(model):
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            for param in own:
                param.fill_(float("nan"))
            init_own_parameters(module)
            if any(torch.isnan(p).any() for p in own):
                raise RuntimeError(f"{type(module).__name__} left a parameter uninitialised")
    return model


def build_backbone(arch: str = "vit_test", *, device: torch.device | str = "cpu", **overrides: Any) -> DinoVisionTransformer:
    """An initialised backbone of a named size, in eval mode; overrides replace ViTSpec fields."""
    return build_from_spec(backbone_spec(arch, **overrides), device=device)


def build_from_spec(spec: ViTSpec, device: torch.device | str = "cpu") -> DinoVisionTransformer:
    """device="meta" returns the backbone unallocated (for counting parameters). To build under
    deepspeed.zero.Init instead, call `DinoVisionTransformer(spec)` inside the context, then `init_partitioned`."""
    model = DinoVisionTransformer(spec, device="meta")
    if str(device) != "meta":
        materialize(model, device)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
