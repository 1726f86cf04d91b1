"""DINO / iBOT projection head: MLP (GELU) -> bottleneck -> L2 normalise -> bias-free linear to the prototypes."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadSpec:
    hidden_dim: int
    bottleneck_dim: int
    n_prototypes: int
    n_layers: int = 3



class ProjectionHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_prototypes: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"a projection head needs at least 2 layers, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out, device=device), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim, device=device))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., n_prototypes) logits."""
        z = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(z)


def build_head(in_dim: int, spec: HeadSpec, device: torch.device | str | None = None) -> ProjectionHead:
    return ProjectionHead(in_dim, spec.n_prototypes, spec.hidden_dim, spec.bottleneck_dim, spec.n_layers, device=device)
