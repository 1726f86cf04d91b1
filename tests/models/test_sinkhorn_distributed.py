"""Sinkhorn-Knopp over 2 gloo processes equals the single-process result on the concatenated batch."""
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.losses import sinkhorn_knopp

# Ranks hold different batch sizes, as iBOT's masked-patch counts do, down to none at all.
SPLITS = ((3, 5), (0, 8))


def _logits() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(0)) * 3


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for split, rows in enumerate(SPLITS):
            start = sum(rows[:rank])
            local = _logits()[start : start + rows[rank]]
            torch.save(sinkhorn_knopp(local, temperature=0.2), f"{out_dir}/split{split}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_sinkhorn_equals_single_process(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    single = sinkhorn_knopp(_logits(), temperature=0.2)
    for split in range(len(SPLITS)):
        distributed = torch.cat([torch.load(tmp_path / f"split{split}_rank{r}.pt") for r in range(2)])
        torch.testing.assert_close(distributed, single, atol=1e-6, rtol=1e-5)
