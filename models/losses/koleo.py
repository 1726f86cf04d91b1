"""KoLeo regulariser: spreads a batch of embeddings by penalising each one's distance to its nearest neighbour."""
import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> -mean_i log(min_{j != i} ||x_i - x_j||) on L2-normalised rows. With B < 2 there is no
        neighbour: returns 0 (still attached to the graph) instead of the NaN of the unguarded formula."""
        if x.shape[0] < 2:
            return x.sum() * 0.0
        x = F.normalize(x.float(), dim=-1, p=2, eps=self.eps)
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(-2.0)  # below any cosine, so a sample is never its own neighbour
            nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
        return -torch.log(distances + self.eps).mean()
