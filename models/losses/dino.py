"""DINO loss: cross-entropy between the student's sharpened softmax and the teacher's Sinkhorn-Knopp targets."""
import torch
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(
        self, student_logits: torch.Tensor, teacher_targets: torch.Tensor, skip_same_crop: bool = False
    ) -> torch.Tensor:
        """student_logits (S, B, K) for S crops, teacher_targets (T, B, K) for T crops. Averages the cross-entropy
        over every (student crop, teacher crop) pair and the batch; with skip_same_crop the pairs s == t (the same
        global crop seen by both) are left out."""
        log_probs = torch.log_softmax(student_logits.float() / self.student_temperature, dim=-1)
        n_student, batch, _ = log_probs.shape
        n_teacher = teacher_targets.shape[0]
        pair_ce = -torch.einsum("sbk,tbk->st", log_probs, teacher_targets.float())  # summed over the batch
        n_pairs = n_student * n_teacher
        if skip_same_crop:
            same = torch.eye(n_student, n_teacher, dtype=torch.bool, device=pair_ce.device)
            pair_ce = pair_ce.masked_fill(same, 0.0)
            n_pairs -= min(n_student, n_teacher)
        if n_pairs == 0:
            raise ValueError("the DINO loss has no crop pair to compare (one global crop with skip_same_crop)")
        return pair_ce.sum() / (n_pairs * batch)
