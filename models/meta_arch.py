"""Student (backbone + DINO and iBOT heads), its EMA teacher and a frozen Gram teacher, and the one call that
turns a batch of crops into the named DINOv3 losses and their weighted total. No optimizer, data or launch here."""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from models.heads import HeadSpec, build_head
from models.losses import DINOLoss, GramLoss, IBOTLoss, KoLeoLoss, downsample_patch_features, sinkhorn_knopp
from models.registry import materialize
from models.vision_transformer import DinoVisionTransformer, ViTSpec


@dataclass(frozen=True)
class LossWeights:
    """total = n_local_pairs/n_pairs * w_local * dino_local + n_global_pairs/n_pairs * dino_global
    + koleo * koleo_loss + ibot * ibot_loss + gram_weight * gram_loss, where w_local is 1, or
    dino_local_in_gram_phase once the Gram loss is on. gram_weight is a forward argument (its ramp is a schedule)."""

    koleo: float = 0.2
    ibot: float = 1.0
    dino_local_in_gram_phase: float = 0.5
    student_temperature: float = 0.1


@dataclass
class CropBatch:
    """global_crops (G, B, C, H, W); local_crops (L, B, C, h, w) or None; masks (G, B, P) bool over the global
    crops' patches (True = the student sees the mask token) or None; gram_crops (G, B, C, H', W') — the global crops
    at the Gram teacher's resolution (e.g. 2x) — or None to give the Gram teacher the global crops themselves."""

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    gram_crops: torch.Tensor | None = None


def _student_modules(spec: ViTSpec, dino: HeadSpec, ibot: HeadSpec, device: torch.device | str) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "backbone": DinoVisionTransformer(spec, device=device),
            "dino_head": build_head(spec.embed_dim, dino, device=device),
            "ibot_head": build_head(spec.embed_dim, ibot, device=device),
        }
    )


class SSLMetaArch(nn.Module):
    def __init__(
        self,
        spec: ViTSpec,
        dino_head: HeadSpec,
        ibot_head: HeadSpec,
        weights: LossWeights = LossWeights(),
        device: torch.device | str = "cpu",
    ) -> None:
        """device="meta" leaves everything unallocated (to count parameters); otherwise the student is initialised
        (NaN fill + explicit init) and the teacher starts as its exact copy."""
        super().__init__()
        self.weights = weights
        self.student = _student_modules(spec, dino_head, ibot_head, "meta")
        self.teacher = _student_modules(spec, dino_head, ibot_head, "meta")
        if str(device) != "meta":
            materialize(self.student, device)
            self.teacher.to_empty(device=device)
            self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.gram_teacher: DinoVisionTransformer | None = None
        self.dino_loss = DINOLoss(weights.student_temperature)
        self.ibot_loss = IBOTLoss(weights.student_temperature)
        self.koleo_loss = KoLeoLoss()
        self.gram_loss = GramLoss()

    def train(self, mode: bool = True) -> "SSLMetaArch":
        # Teachers always run as at inference: no drop path, no RoPE coordinate augmentation.
        super().train(mode)
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student."""
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, list(self.student.parameters()), alpha=1.0 - momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Take (or refresh) the Gram teacher: a frozen snapshot of the EMA teacher's backbone."""
        if self.gram_teacher is None:
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"]).eval().requires_grad_(False)
        else:
            self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())

    @torch.no_grad()
    def _teacher_targets(
        self, global_flat: torch.Tensor, masks_flat: torch.Tensor | None, n_global: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.teacher["backbone"].forward_features(global_flat)
        dino_logits = self.teacher["dino_head"](features["x_norm_clstoken"])  # (G*B, K)
        dino_targets = sinkhorn_knopp(dino_logits, temperature).unflatten(0, (n_global, -1))  # (G, B, K)
        ibot_targets = None
        if masks_flat is not None:
            ibot_logits = self.teacher["ibot_head"](features["x_norm_patchtokens"][masks_flat])  # (M, K')
            ibot_targets = sinkhorn_knopp(ibot_logits, temperature)
        return dino_targets, ibot_targets

    @torch.no_grad()
    def _gram_targets(self, crops: torch.Tensor, student_grid: tuple[int, int]) -> torch.Tensor:
        patches = self.gram_teacher.forward_features(crops)["x_norm_patchtokens"]
        patch = self.gram_teacher.patch_size
        grid = (crops.shape[-2] // patch, crops.shape[-1] // patch)
        return patches if grid == student_grid else downsample_patch_features(patches, grid, student_grid)

    def forward(self, batch: CropBatch, teacher_temperature: float, gram_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """The named losses and "total". gram_weight > 0 needs refresh_gram_teacher() to have been called."""
        n_global, batch_size = batch.global_crops.shape[:2]
        global_flat = batch.global_crops.flatten(0, 1)  # (G, B, C, H, W) -> (G*B, C, H, W)
        # Even with nothing masked on this rank, iBOT runs (on 0 patches): its Sinkhorn-Knopp all-reduces.
        masks_flat = None if batch.masks is None else batch.masks.flatten(0, 1)  # (G*B, P)
        dino_targets, ibot_targets = self._teacher_targets(global_flat, masks_flat, n_global, teacher_temperature)

        crops = [global_flat]
        if batch.local_crops is not None:
            crops.append(batch.local_crops.flatten(0, 1))
        student = self.student["backbone"].forward_features_list(
            crops, [masks_flat] + [None] * (len(crops) - 1), local_crops=[False] + [True] * (len(crops) - 1)
        )
        cls = torch.cat([out["x_norm_clstoken"] for out in student])
        dino_logits = self.student["dino_head"](cls).unflatten(0, (-1, batch_size))  # (G+L, B, K)
        losses: dict[str, torch.Tensor] = {}
        n_local = dino_logits.shape[0] - n_global
        n_global_pairs = n_global * (n_global - 1)
        n_local_pairs = n_local * n_global
        n_pairs = n_global_pairs + n_local_pairs
        total = cls.new_zeros(())
        if n_local_pairs:
            local_weight = self.weights.dino_local_in_gram_phase if gram_weight > 0 else 1.0
            losses["dino_local"] = self.dino_loss(dino_logits[n_global:], dino_targets)
            total = total + n_local_pairs / n_pairs * local_weight * losses["dino_local"]
        if n_global_pairs:
            losses["dino_global"] = self.dino_loss(dino_logits[:n_global], dino_targets, skip_same_crop=True)
            total = total + n_global_pairs / n_pairs * losses["dino_global"]

        global_cls = student[0]["x_norm_clstoken"].unflatten(0, (n_global, batch_size))  # (G, B, D)
        losses["koleo"] = torch.stack([self.koleo_loss(crop_cls) for crop_cls in global_cls]).mean()
        total = total + self.weights.koleo * losses["koleo"]

        if masks_flat is not None:
            ibot_logits = self.student["ibot_head"](student[0]["x_norm_patchtokens"][masks_flat])
            losses["ibot"] = self.ibot_loss(ibot_logits, ibot_targets, masks_flat)
            total = total + self.weights.ibot * losses["ibot"]

        if gram_weight > 0:
            if self.gram_teacher is None:
                raise RuntimeError("gram_weight > 0 but no Gram teacher: call refresh_gram_teacher() first")
            patch = self.student["backbone"].patch_size
            grid = (global_flat.shape[-2] // patch, global_flat.shape[-1] // patch)
            gram_input = global_flat if batch.gram_crops is None else batch.gram_crops.flatten(0, 1)
            losses["gram"] = self.gram_loss(student[0]["x_norm_patchtokens"], self._gram_targets(gram_input, grid))
            total = total + gram_weight * losses["gram"]
        losses["total"] = total
        return losses
