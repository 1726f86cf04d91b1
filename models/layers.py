"""The pieces of a DINOv3 transformer block: attention with axial RoPE, MLP / SwiGLU FFN, LayerScale, and the
pre-norm block that runs a list of crops of different sizes together."""
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.rope import apply_rope

FfnKind = Literal["mlp", "swiglu"]
RopeTables = tuple[torch.Tensor, torch.Tensor]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, device=device)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias, device=device)
        self.w2 = nn.Linear(dim, hidden_dim, bias=bias, device=device)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


FFN_CLASSES: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLU}


class QKVProjection(nn.Module):
    """One (3D, D) projection for q, k and v. The optional bias covers q and v only: a key bias adds the same
    q.b_k to every logit of a query row and cancels in the softmax, so it is left out rather than masked."""

    def __init__(self, dim: int, bias: bool, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3 * dim, dim, device=device))
        self.q_bias = nn.Parameter(torch.empty(dim, device=device)) if bias else None
        self.v_bias = nn.Parameter(torch.empty(dim, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return F.linear(x, self.weight, bias)


class Attention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = QKVProjection(dim, qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def attend(self, qkv: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        batch, n_tokens, three_dim = qkv.shape
        dim = three_dim // 3
        # (B, N, 3D) -> 3 x (B, heads, N, D/heads)
        q, k, v = qkv.view(batch, n_tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, n_tokens, dim)  # (B, heads, N, D/heads) -> (B, N, D)

    def forward_list(self, xs: list[torch.Tensor], ropes: list[RopeTables | None]) -> list[torch.Tensor]:
        # The projections run once over the tokens of all crops; attention runs per crop (different N).
        qkvs = _per_crop(self.qkv, xs)
        return _per_crop(self.proj, [self.attend(qkv, rope) for qkv, rope in zip(qkvs, ropes, strict=True)])


def _per_crop(layer: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Apply a token-wise layer to the tokens of every crop in one call."""
    if len(xs) == 1:
        return [layer(xs[0])]
    flat = torch.cat([x.flatten(0, 1) for x in xs])  # sum_i(B_i*N_i), D
    out = layer(flat).split([x.shape[0] * x.shape[1] for x in xs])
    return [o.view(*x.shape[:2], o.shape[-1]) for o, x in zip(out, xs, strict=True)]


class Block(nn.Module):
    """Pre-norm block, x + ls1(attn(norm1 x)), then x + ls2(ffn(norm2 x)). Drop path drops whole samples: in
    training only a random subset of each crop batch goes through a branch, and its residual is scaled up so the
    expectation is unchanged (this also saves the dropped samples' compute)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: FfnKind,
        ffn_hidden_dim: int,
        qkv_bias: bool,
        proj_bias: bool,
        ffn_bias: bool,
        layerscale_init: float,
        norm_eps: float,
        drop_path: float,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, device=device)
        self.ls1 = LayerScale(dim, layerscale_init, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.mlp = FFN_CLASSES[ffn](dim, ffn_hidden_dim, bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, layerscale_init, device=device)
        self.drop_path = drop_path

    def _attn_branch(self, xs: list[torch.Tensor], ropes: list[RopeTables | None]) -> list[torch.Tensor]:
        return [self.ls1(o) for o in self.attn.forward_list(_per_crop(self.norm1, xs), ropes)]

    def _ffn_branch(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.ls2(o) for o in _per_crop(lambda t: self.mlp(self.norm2(t)), xs)]

    def _residual(
        self, xs: list[torch.Tensor], branch: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        if not (self.training and self.drop_path > 0.0):
            return [x + out for x, out in zip(xs, branch(xs), strict=True)]
        keep = [max(int(x.shape[0] * (1.0 - self.drop_path)), 1) for x in xs]
        kept = [torch.randperm(x.shape[0], device=x.device)[:k] for x, k in zip(xs, keep, strict=True)]
        outs = branch([x[idx] for x, idx in zip(xs, kept, strict=True)])
        return [
            torch.index_add(x, 0, idx, out.to(x.dtype), alpha=x.shape[0] / k)
            for x, idx, out, k in zip(xs, kept, outs, keep, strict=True)
        ]

    def forward(self, xs: list[torch.Tensor], ropes: list[RopeTables | None]) -> list[torch.Tensor]:
        xs = self._residual(xs, lambda sub: self._attn_branch(sub, ropes))
        return self._residual(xs, self._ffn_branch)
