"""iBOT loss: the student predicts, for each masked patch, the teacher's target on the unmasked crop."""
import torch
from torch import nn


class IBOTLoss(nn.Module):
    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """student_logits and teacher_targets (M, K) for the M masked patches, in the order of masks.nonzero();
        masks (N, P) bool over the N images. Cross-entropy averaged over each image's masked patches, then over the
        images that have any."""
        per_patch = -(teacher_targets.float() * torch.log_softmax(student_logits.float() / self.student_temperature, -1)).sum(-1)
        n_masked = masks.sum(dim=1)  # (N,)
        weights = (1.0 / n_masked.clamp(min=1).float()).unsqueeze(1).expand_as(masks)[masks]  # (M,)
        n_images = (n_masked > 0).sum().clamp(min=1)
        return (per_patch * weights).sum() / n_images
