"""vfm models: the DINOv3 ViT family, its heads and losses, the student-teacher meta-architecture, weight
import/export and the resource plan. Plain torch: no Ray, no MLflow, nothing from pipeline/."""
from models.registry import ARCHS, HEADS, backbone_spec, build_backbone, build_from_spec, count_parameters
from models.vision_transformer import IMAGENET_MEAN, IMAGENET_STD, DinoVisionTransformer, ViTSpec

__all__ = [
    "ARCHS",
    "HEADS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DinoVisionTransformer",
    "ViTSpec",
    "backbone_spec",
    "build_backbone",
    "build_from_spec",
    "count_parameters",
]
