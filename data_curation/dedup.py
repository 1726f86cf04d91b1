"""Exact and near-duplicate removal (DINOv2 style).

Exact duplicates share a sha256. Near duplicates are found among the distinct images: a
faiss k-NN search on unit-norm descriptors, an edge wherever cosine similarity exceeds
the threshold, connected components over those edges. The descriptors are searched a
block at a time and only the edges are kept, so the index is the one copy in RAM. Each
component (exact copies included) is one duplicate group; the first row of a group in
input order is kept, so the choice is deterministic.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data_curation.knn import RowSet, build_ip_index, return_freed_memory, search_blocks
from data_curation.progress import Progress


@dataclass(frozen=True)
class DedupResult:
    group: np.ndarray  # (N,) int64, groups numbered by first appearance
    kept: np.ndarray  # (N,) bool, one True per group
    kind: np.ndarray  # (N,) object: None when kept, "exact" (same bytes as the kept row) or "near"

    @property
    def n_exact(self) -> int:
        return int((self.kind == "exact").sum())

    @property
    def n_near(self) -> int:
        return int((self.kind == "near").sum())


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def sha256_digests(hex_digests: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N,) 32-byte values (numpy ``V32``) from N sha256 hex strings: 32 bytes an image, no
    Python object each, as :func:`deduplicate` compares them."""
    strings = pa.chunked_array([hex_digests]) if isinstance(hex_digests, pa.Array) else hex_digests
    parts = []
    for chunk in strings.chunks:
        chunk = chunk.cast(pa.large_string())  # 64-bit offsets: one buffer of any size
        offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
        if chunk.null_count or np.any(np.diff(offsets) != 64):
            raise ValueError("sha256 digests must be 64 hex digits each, with no nulls")
        text = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, 32, 2)
        nibbles = _HEX[text]
        if np.any(nibbles == 255):
            raise ValueError("sha256 digests must be hex digits only")
        parts.append((nibbles[:, :, 0] << 4) | nibbles[:, :, 1])
    digests = np.concatenate(parts) if parts else np.zeros((0, 32), np.uint8)
    return np.ascontiguousarray(digests).view("V32").ravel()


def deduplicate(sha256: list[str] | np.ndarray, descriptors: RowSet | np.ndarray, threshold: float = 0.99,
                k: int = 16, log: Callable[[str], None] | None = None) -> DedupResult:
    """Group rows that are byte-identical or whose descriptors are more similar than ``threshold``.

    ``sha256`` holds one comparable value per row (hex strings, or :func:`sha256_digests`);
    ``descriptors`` is (N, D) float32 with unit-norm rows (zero rows never match anything),
    an array or the rows of memory-mapped chunks. ``log`` gets progress lines on a long search
    (:class:`~data_curation.progress.Progress`).
    """
    sha = np.asarray(sha256)
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
    progress = Progress(log, "near dedup", m, "distinct images searched")
    for start, sims, neighbours in search_blocks(index, vectors, min(k + 1, m), exact_above=threshold):
        rows = np.arange(start, start + len(sims))[:, None]
        edge = (sims > threshold) & (neighbours >= 0) & (neighbours != rows)
        src.append(np.broadcast_to(rows, edge.shape)[edge])
        dst.append(neighbours[edge])
        progress(start + len(sims))
    del index
    return_freed_memory()
    src, dst = np.concatenate(src), np.concatenate(dst)
    from scipy.sparse import coo_matrix  # scipy: imported by a dedup, not with the stages
    from scipy.sparse.csgraph import connected_components

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
