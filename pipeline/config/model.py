"""Config of the model: which backbone size, the knobs a user tunes, and the crops the FLOP count assumes.
Fields left at None take the chosen arch's preset value (models/registry.py), so switching `arch` alone gives
that size's recipe; the defaults are the `local` preset (vit_test, CPU-friendly)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from pipeline.config.base import Section

if TYPE_CHECKING:
    from models.heads import HeadSpec
    from models.vision_transformer import ViTSpec

# The names of models.registry.ARCHS, spelled out so that loading a config does not import torch
# (tests/models/test_config.py checks that the two lists agree).
ArchName = Literal["vit_test", "vit_small", "vit_base", "vit_large", "vit_huge_plus", "vit_7b"]


class ModelConfig(Section):
    arch: ArchName = Field("vit_test", description="Backbone size from the registry: vit_test (tiny, for tests "
                                                    "and CPU runs), vit_small, vit_base, vit_large, vit_huge_plus, vit_7b.")
    drop_path: float | None = Field(None, ge=0.0, lt=1.0, description="Drop-path (stochastic depth) rate, uniform "
                                                                      "over blocks; None: the arch's (vit_7b 0.4, others 0).")
    layerscale_init: float | None = Field(None, gt=0.0, description="Initial LayerScale value; None: 1e-5.")
    ffn: Literal["mlp", "swiglu"] | None = Field(None, description="FFN type; None: the arch's.")
    ffn_hidden_dim: int | None = Field(None, ge=1, description="FFN hidden width; None: the arch's.")
    n_storage_tokens: int | None = Field(None, ge=0, description="Storage (register) tokens; None: the arch's.")
    activation_checkpointing: bool = Field(False, description="Recompute each block in the backward pass: less "
                                                              "activation memory for about 1/3 more compute.")
    dino_hidden_dim: int | None = Field(None, ge=1, description="DINO head MLP width; None: the arch's.")
    dino_bottleneck_dim: int | None = Field(None, ge=1, description="DINO head bottleneck; None: the arch's.")
    dino_prototypes: int | None = Field(None, ge=2, description="DINO head prototypes K; None: the arch's.")
    ibot_hidden_dim: int | None = Field(None, ge=1, description="iBOT head MLP width; None: the arch's.")
    ibot_bottleneck_dim: int | None = Field(None, ge=1, description="iBOT head bottleneck; None: the arch's.")
    ibot_prototypes: int | None = Field(None, ge=2, description="iBOT head prototypes; None: the arch's.")
    global_crop_size: int = Field(32, ge=1, description="Side of the global crops, a multiple of the patch size.")
    local_crop_size: int = Field(16, ge=1, description="Side of the local crops, a multiple of the patch size.")
    n_global_crops: int = Field(2, ge=1, description="Global crops per image.")
    n_local_crops: int = Field(4, ge=0, description="Local crops per image.")

    def vit_spec(self) -> ViTSpec:
        """The backbone spec: the arch's preset with every field set here replacing the preset's."""
        from models.registry import backbone_spec

        overrides = {
            "drop_path": self.drop_path,
            "layerscale_init": self.layerscale_init,
            "ffn": self.ffn,
            "ffn_hidden_dim": self.ffn_hidden_dim,
            "n_storage_tokens": self.n_storage_tokens,
        }
        return backbone_spec(
            self.arch,
            activation_checkpointing=self.activation_checkpointing,
            **{name: value for name, value in overrides.items() if value is not None},
        )

    def head_specs(self) -> tuple[HeadSpec, HeadSpec]:
        """(DINO head, iBOT head): the arch's head sizes with every field set here replacing the preset's."""
        from dataclasses import replace

        from models.registry import HEADS

        dino, ibot = HEADS[self.arch]

        def chosen(hidden: int | None, bottleneck: int | None, prototypes: int | None) -> dict[str, int]:
            fields = {"hidden_dim": hidden, "bottleneck_dim": bottleneck, "n_prototypes": prototypes}
            return {name: value for name, value in fields.items() if value is not None}

        return (
            replace(dino, **chosen(self.dino_hidden_dim, self.dino_bottleneck_dim, self.dino_prototypes)),
            replace(ibot, **chosen(self.ibot_hidden_dim, self.ibot_bottleneck_dim, self.ibot_prototypes)),
        )
