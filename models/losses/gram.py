"""Gram anchoring: keep the student's patch-to-patch similarity structure close to a frozen Gram teacher's."""
import torch
import torch.nn.functional as F
from torch import nn


def downsample_patch_features(features: torch.Tensor, source_grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch features on a source grid -> (B, h'*w', D) on the target grid, bicubic. Lets a Gram
    teacher that saw the crop at 2x resolution be compared with the student's grid."""
    batch, n_patches, dim = features.shape
    if n_patches != source_grid[0] * source_grid[1]:
        raise ValueError(f"{n_patches} patch features do not form a {source_grid[0]}x{source_grid[1]} grid")
    grid = features.transpose(1, 2).reshape(batch, dim, *source_grid)  # (B, D, h, w)
    resized = F.interpolate(grid.float(), size=target_grid, mode="bicubic", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(features.dtype)  # (B, D, h', w') -> (B, h'*w', D)


class GramLoss(nn.Module):
    def forward(self, student_patches: torch.Tensor, teacher_patches: torch.Tensor) -> torch.Tensor:
        """student_patches, teacher_patches (B, P, D): per-patch L2 normalisation, one P x P Gram matrix per image,
        mean squared difference."""
        if student_patches.shape != teacher_patches.shape:
            raise ValueError(f"student {tuple(student_patches.shape)} and teacher {tuple(teacher_patches.shape)} patches differ")
        student = F.normalize(student_patches.float(), dim=-1)
        teacher = F.normalize(teacher_patches.float(), dim=-1)
        return F.mse_loss(student @ student.transpose(1, 2), teacher @ teacher.transpose(1, 2))
