"""The encoding job: build one backbone (a checkpoint, or a random init of an architecture) and
embed named sets of images with it.

This is the unit of heavy work, so it is self-contained and picklable: the pipeline stage
runs it as a Ray task (on a GPU when the cluster has one), ``vfm eval`` runs it in-process.
The backbone is built inside the job, so the caller never holds the weights and a
checkpoint on S3 is read where the job runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from data_curation.storage import Storage
from models.evaluation.features import Features, extract_features, extract_patch_grid
from models.registry import build_from_spec
from models.vision_transformer import DinoVisionTransformer, ViTSpec
from models.weights import load_backbone

# The fields that fix the shape of a backbone's weights; the rest (drop path, RoPE
# augmentation, the training-only untied local norm) do not change which checkpoints fit.
SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "ffn", "ffn_hidden_dim", "n_storage_tokens",
                "qkv_bias", "proj_bias", "ffn_bias", "in_chans")


class ArchitectureMismatch(ValueError):
    """A checkpoint's architecture is not the configured one; the message names both, in one line."""


@dataclass(frozen=True)
class BackboneSource:
    """A checkpoint URI (local or s3://) or, when ``checkpoint`` is None, a random init of ``spec``.

    With a checkpoint, ``spec`` (when given) is the configured architecture it must match.
    The random init seeds torch with ``seed`` right before building, the same rule for every run.
    """

    checkpoint: str | None = None
    spec: ViTSpec | None = None
    seed: int = 0
    s3_options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> tuple[DinoVisionTransformer, dict[str, Any]]:
        if self.checkpoint is None:
            if self.spec is None:
                raise ValueError("a random-init backbone needs an architecture")
            torch.manual_seed(self.seed)
            return build_from_spec(self.spec), {"format": "random_init"}
        backbone, info = load_backbone(self.checkpoint, Storage(self.s3_options))
        if self.spec is not None:
            check_architecture(self.checkpoint, backbone.spec, self.spec)
        return backbone.eval(), dict(info)


def check_architecture(checkpoint: str, found: ViTSpec, expected: ViTSpec) -> None:
    differing = [f"{name} {getattr(found, name)} (configured {getattr(expected, name)})"
                 for name in SHAPE_FIELDS if getattr(found, name) != getattr(expected, name)]
    if differing:
        raise ArchitectureMismatch(f"checkpoint {checkpoint} does not match the configured architecture: "
                                   + ", ".join(differing))


@dataclass
class Encoded:
    features: dict[str, Features]  # image-set name -> CLS and mean-patch features
    patch_grids: dict[str, np.ndarray]  # image-set name -> (N, h, w, D) patch features
    spec: ViTSpec  # the architecture that was built
    info: dict[str, Any]  # what load_backbone said about the checkpoint (format, ...)


def encode_images(source: BackboneSource, image_sets: dict[str, list[np.ndarray]],
                  patch_sets: dict[str, list[np.ndarray]], resolution: int, batch_size: int = 256,
                  device: str = "auto", threads: int | None = None) -> Encoded:
    """Build the backbone of ``source``; CLS/mean-patch features of ``image_sets``, patch grids of ``patch_sets``."""
    if threads:
        torch.set_num_threads(threads)
    backbone, info = source.build()
    features = {name: extract_features(backbone, images, resolution, batch_size, device)
                for name, images in image_sets.items()}
    grids = {name: extract_patch_grid(backbone, images, resolution, device)
             for name, images in patch_sets.items() if images}
    return Encoded(features, grids, backbone.spec, info)
