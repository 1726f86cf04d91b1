"""Sinkhorn-Knopp teacher targets, correct under torch.distributed (global sums are all-reduced) and with one
process. Shared by the DINO and iBOT losses."""
import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """(B, K) local teacher logits -> (B, K) targets; each row sums to 1 and, over all ranks' rows, every
    prototype receives about B_global / K of the mass. B_global is the sum of B over ranks (ranks may differ)."""
    logits = teacher_logits.float() / temperature
    # A global max shift keeps exp() finite; it is a constant factor the first normalisation removes.
    # A rank may hold no rows (no masked patch for iBOT) and must still join every all-reduce.
    local_max = logits.max().reshape(1) if logits.numel() else logits.new_full((1,), float("-inf"))
    logits = logits - _all_reduce(local_max, dist.ReduceOp.MAX)
    q = torch.exp(logits).t()  # (K, B)
    n_prototypes = q.shape[0]
    n_samples = _all_reduce(torch.tensor([float(q.shape[1])], device=q.device))
    # exp() can underflow to 0 for a whole prototype (or sample) far below the max: keep those at 0, not 0/0.
    tiny = torch.finfo(q.dtype).tiny
    q /= _all_reduce(q.sum().reshape(1))
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype's total mass -> 1
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample's mass -> 1
        q /= n_samples
    q *= n_samples
    return q.t()
