"""Retrieval-based curation: the pool images nearest to a set of seed images.

Given seed embeddings from any source, the k nearest pool images of each seed (cosine,
faiss) join the selection; DINOv2 builds its retrieval-augmented data this way
(k = 4..32 per seed).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from data_curation.knn import RowSet, knn_search


def retrieval_picks(pool: RowSet | np.ndarray, seeds: RowSet | np.ndarray, k: int,
                    log: Callable[[str], None] | None = None) -> np.ndarray:
    """Sorted unique pool row indices among the ``k`` nearest neighbours of each seed.

    ``pool`` (N, D) and ``seeds`` (S, D), arrays or the rows of memory-mapped chunks, hold
    unit-norm rows. ``log`` gets progress lines on a long search
    (:class:`~data_curation.progress.Progress`).
    """
    if len(pool) == 0 or len(seeds) == 0:
        return np.zeros(0, dtype=np.int64)
    _sims, neighbours = knn_search(pool, seeds, k, log, "retrieval")
    found = neighbours.ravel()
    return np.unique(found[found >= 0]).astype(np.int64)
