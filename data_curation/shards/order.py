"""The order of an epoch and who reads what: pure functions of (seed, epoch) and the reader layout.

An epoch is read as one *epoch sequence*: the shards in a seeded order, their samples
concatenated. Each rank takes an equal contiguous stretch of it (so ranks never wait on
one another: when the sample count does not divide, the sequence is padded by repeating
its first samples, or cut short), and each DataLoader worker of a rank takes a contiguous
part of the rank's stretch. Contiguous stretches mean whole shards read front to back,
except at most two partial shards per reader, which are entered at an index offset.

The *global stream* is the order in which training consumes samples: position p belongs
to rank p % world_size as its (p // world_size)-th sample, and a rank's DataLoader takes
whole batches from its workers in turn (batch j from worker j % num_workers). A resume
point is a global position; every reader works out how much of it was its own. Through a
DataLoader, resume at a whole step (a multiple of batch_size * world_size): workers form
their batches themselves, so a batch cut in two cannot be put back together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's shard permutation."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def block_order(seed: int, epoch: int, block_start: int, length: int) -> np.ndarray:
    """The shuffle of one block of a reader's stretch, keyed by where the block starts."""
    return np.random.default_rng([seed, epoch, 1, block_start]).permutation(length)


def _belonging(positions: int, owner: int, owners: int) -> int:
    """How many of 0..positions-1 have ``p % owners == owner``."""
    return max(0, (positions - owner + owners - 1) // owners)


@dataclass(frozen=True)
class StreamLayout:
    """How the readers of a training job are arranged."""

    world_size: int = 1
    num_workers: int = 1  # DataLoader workers per rank (1 when reading in the main process)
    batch_size: int = 1  # the DataLoader's batch size: each batch comes whole from one worker
    drop_uneven: bool = False  # cut the epoch to a multiple of world_size instead of padding it

    def __post_init__(self):
        if self.world_size < 1 or self.num_workers < 1 or self.batch_size < 1:
            raise ValueError(f"world_size, num_workers and batch_size must be >= 1, got {self}")

    def rank_length(self, total: int) -> int:
        """Samples each rank reads per epoch (the same for every rank)."""
        if self.drop_uneven:
            return total // self.world_size
        return -(-total // self.world_size) if total else 0

    def worker_share(self, rank_positions: int, worker: int) -> int:
        """How many of a rank's first ``rank_positions`` samples its ``worker`` produces."""
        batches, partial = divmod(rank_positions, self.batch_size)
        own = _belonging(batches, worker, self.num_workers) * self.batch_size
        return own + (partial if batches % self.num_workers == worker else 0)

    def reader_range(self, total: int, rank: int, worker: int) -> tuple[int, int]:
        """(first epoch-sequence position, count) read by ``worker`` of ``rank``."""
        length = self.rank_length(total)
        before = sum(self.worker_share(length, w) for w in range(worker))
        return rank * length + before, self.worker_share(length, worker)

    def consumed(self, start: int, rank: int, worker: int) -> int:
        """How many samples of reader (rank, worker) lie before global position ``start``."""
        return self.worker_share(_belonging(start, rank, self.world_size), worker)

    def role(self, start: int, rank: int, worker: int) -> int:
        """Which reader's part ``worker`` of ``rank`` plays when the epoch resumes at ``start``.

        A fresh DataLoader iterator asks worker 0 first, but the next batch of the stream may
        belong to another worker: the workers' parts are rotated so that it is worker 0's.
        """
        return (worker + _belonging(start, rank, self.world_size) // self.batch_size) % self.num_workers

    def global_position(self, rank: int, worker: int, local: int) -> int:
        """The global stream position of the ``local``-th sample of reader (rank, worker)."""
        own_batch, within = divmod(local, self.batch_size)
        rank_position = (own_batch * self.num_workers + worker) * self.batch_size + within
        return rank_position * self.world_size + rank
