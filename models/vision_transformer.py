"""The DINOv3 vision transformer backbone: conv patch embed, CLS + storage tokens, a learned mask token, pre-norm
blocks with axial RoPE, a final norm and an optional untied norm for the CLS/storage tokens of local crops."""
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import Block, FfnKind
from models.rope import AxialRoPE, identity_for_prefix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTSpec:
    """Everything that fixes a backbone's shape and behaviour."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    ffn: FfnKind
    ffn_hidden_dim: int
    n_storage_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-5
    drop_path: float = 0.0
    untie_local_norm: bool = False
    in_chans: int = 3
    rope_base: float = 100.0
    rope_shift: float | None = None
    rope_jitter: float | None = None
    rope_rescale: float | None = 2.0
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"head dim {self.embed_dim // self.num_heads} must be divisible by 4 for axial RoPE")
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DinoVisionTransformer(nn.Module):
    def __init__(self, spec: ViTSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.embed_dim = spec.embed_dim
        self.patch_size = spec.patch_size
        self.n_storage_tokens = spec.n_storage_tokens
        self.patch_embed = nn.Conv2d(
            spec.in_chans, spec.embed_dim, kernel_size=spec.patch_size, stride=spec.patch_size, device=device
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, spec.embed_dim, device=device))
        self.storage_tokens = nn.Parameter(torch.empty(1, spec.n_storage_tokens, spec.embed_dim, device=device))
        self.mask_token = nn.Parameter(torch.empty(1, spec.embed_dim, device=device))
        self.rope = AxialRoPE(
            spec.embed_dim // spec.num_heads, spec.rope_base, spec.rope_shift, spec.rope_jitter, spec.rope_rescale
        )
        self.blocks = nn.ModuleList(
            Block(
                spec.embed_dim,
                spec.num_heads,
                spec.ffn,
                spec.ffn_hidden_dim,
                spec.qkv_bias,
                spec.proj_bias,
                spec.ffn_bias,
                spec.layerscale_init,
                spec.norm_eps,
                spec.drop_path,
                device=device,
            )
            for _ in range(spec.depth)
        )
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps, device=device)
        self.local_cls_norm = (
            nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps, device=device) if spec.untie_local_norm else None
        )
        self.activation_checkpointing = spec.activation_checkpointing

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.spec.in_chans:
            raise ValueError(f"expected {self.spec.in_chans} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> (B, 1+R+P, D) tokens and the (h, w) patch grid; masked patches become the mask token."""
        self._check_input(x)
        patches = self.patch_embed(x)  # (B, D, h, w)
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)  # (B, P, D)
        if masks is not None:
            if masks.shape != patches.shape[:2]:
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not match {patches.shape[:2]} patches")
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        batch = patches.shape[0]
        prefix = torch.cat([self.cls_token, self.storage_tokens], dim=1).to(patches.dtype).expand(batch, -1, -1)
        return torch.cat([prefix, patches], dim=1), grid

    def forward_features_list(
        self,
        xs: list[torch.Tensor],
        masks: list[torch.Tensor | None] | None = None,
        local_crops: list[bool] | None = None,
    ) -> list[dict[str, torch.Tensor | None]]:
        """One forward for crops of different sizes. local_crops[i] marks entries that are local crops: in
        training their CLS/storage tokens go through the untied local norm when the model has one."""
        masks = masks if masks is not None else [None] * len(xs)
        local_crops = local_crops if local_crops is not None else [False] * len(xs)
        tokens, grids = zip(*(self.prepare_tokens(x, m) for x, m in zip(xs, masks, strict=True)), strict=True)
        tokens = list(tokens)
        n_prefix = 1 + self.n_storage_tokens
        # One draw of the training-time coordinate augmentation per crop group and forward, shared by all blocks.
        ropes = [identity_for_prefix(*self.rope(h, w, device=t.device), n_prefix)
                 for t, (h, w) in zip(tokens, grids, strict=True)]
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                tokens = checkpoint(block, tokens, ropes, use_reentrant=False)
            else:
                tokens = block(tokens, ropes)
        outputs = []
        for x, mask, is_local in zip(tokens, masks, local_crops, strict=True):
            normed = self.norm(x)
            prefix = normed[:, :n_prefix]
            if is_local and self.training and self.local_cls_norm is not None:
                prefix = self.local_cls_norm(x[:, :n_prefix])
            outputs.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": normed[:, n_prefix:],
                    "x_prenorm": x,
                    "masks": mask,
                }
            )
        return outputs

    def forward_features(
        self,
        x: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor | None] | None = None,
        local_crops: list[bool] | None = None,
    ) -> dict[str, torch.Tensor | None] | list[dict[str, torch.Tensor | None]]:
        if isinstance(x, torch.Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(list(x), masks, local_crops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normed CLS token (B, D), the usual embedding for k-NN / linear probes."""
        return self.forward_features(x)["x_norm_clstoken"]
