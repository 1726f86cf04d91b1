"""The DINOv3 training losses, each a small module, and the one Sinkhorn-Knopp they share."""
from models.losses.dino import DINOLoss
from models.losses.gram import GramLoss, downsample_patch_features
from models.losses.ibot import IBOTLoss
from models.losses.koleo import KoLeoLoss
from models.losses.sinkhorn import sinkhorn_knopp

__all__ = ["DINOLoss", "GramLoss", "IBOTLoss", "KoLeoLoss", "downsample_patch_features", "sinkhorn_knopp"]
