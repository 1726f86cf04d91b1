"""Exact and near-duplicate removal (DINOv2 style).

Exact duplicates share a sha256. Near duplicates are found among the distinct images: a
faiss k-NN search on unit-norm descriptors, an edge wherever cosine similarity exceeds
the threshold, connected components over those edges. The descriptors are searched a
block at a time and only the edges are kept, so the index is the one copy in RAM. Each
component (exact copies included) is one duplicate group; the first row of a group in
input order is kept, so the choice is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data_curation.knn import RowSet, build_ip_index, search_blocks


@dataclass(frozen=True)
class DedupResult:
    group: np.ndarray  # (N,) int64, groups numbered by first appearance
    kept: np.ndarray  # (N,) bool, one True per group
    kind: np.ndarray  # (N,) object: None when kept, "exact" (same bytes as the kept row) or "near"

    @property
    def n_exact(self) -> int:
        return int(sum(k == "exact" for k in self.kind))

    @property
    def n_near(self) -> int:
        return int(sum(k == "near" for k in self.kind))


def deduplicate(sha256: list[str] | np.ndarray, descriptors: RowSet | np.ndarray, threshold: float = 0.99,
                k: int = 16) -> DedupResult:
    """Group rows that are byte-identical or whose descriptors are more similar than ``threshold``.

    ``descriptors`` is (N, D) float32 with unit-norm rows (zero rows never match anything),
    an array or the rows of memory-mapped chunks.
    """
    sha = np.asarray(sha256, dtype=object)
    n = len(sha)
    if n == 0:
        return DedupResult(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, object))
    # Exact: every row points at the first row with the same bytes.
    _, first, same = np.unique(sha, return_index=True, return_inverse=True)
    representative = first[same.ravel()]
    unique_rows = np.sort(first)

    # Near: k-NN among the distinct images only, then connected components.
    vectors = RowSet.of(descriptors).subset(unique_rows)
    m = len(unique_rows)
    index = build_ip_index(vectors)
    src, dst = [], []
    for start, sims, neighbours in search_blocks(index, vectors, min(k + 1, m)):
        rows = np.arange(start, start + len(sims))[:, None]
        edge = (sims > threshold) & (neighbours >= 0) & (neighbours != rows)
        src.append(np.broadcast_to(rows, edge.shape)[edge])
        dst.append(neighbours[edge])
    del index
    src, dst = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(m, m))
    _count, component = connected_components(graph, directed=False)

    component_of_row = component[np.searchsorted(unique_rows, representative)]

    # Renumber groups by first appearance; the first row of each group is kept.
    _, first_index, inverse = np.unique(component_of_row, return_index=True, return_inverse=True)
    order = np.argsort(first_index, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    group = rank[inverse].astype(np.int64)
    keeper = np.sort(first_index)  # keeper[g] = the kept row of group g
    kept = np.zeros(n, dtype=bool)
    kept[keeper] = True
    kind = np.full(n, None, dtype=object)
    removed = ~kept
    same_bytes = sha[removed] == sha[keeper[group[removed]]]
    kind[removed] = np.where(same_bytes, "exact", "near")
    return DedupResult(group, kept, kind)
