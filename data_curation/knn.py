"""Inner-product k-NN with faiss: exact for small pools, IVF for large ones, GPU when there is one.

Vectors come as a :class:`RowSet`: some rows of a list of (N_i, D) arrays, usually the
memory-mapped embedding chunks. Indexes are filled and searched one block at a time, so
besides the index itself (what faiss needs) only a block of vectors is ever in RAM.

A large pool's IVF index stores each vector as one byte per dimension (8-bit scalar
quantization of its residual to its list's centroid: a quarter of float32, ~D + 8 bytes a
vector with its id). The per-dimension ranges are taken over every stored residual, so
no value is clipped and a decoded similarity is off by at most ``|q| . range / 510``;
wherever that leaves a neighbour's similarity in doubt (within that bound of what the caller
asks for: the dedup threshold, or every neighbour for retrieval), it is computed again
exactly from the mapped vectors. Similarities that callers see are exact where it matters.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from data_curation.progress import Progress

# Above this many base vectors an exact (flat) search is replaced by an IVF index.
FLAT_MAX = 200_000
# Codes of the IVF index: 8 bits per dimension, ranges per dimension.
_SQ_TYPE = faiss.ScalarQuantizer.QT_8bit
# Vectors copied out of the parts per faiss call: 12 MiB at D=384 (faiss's own search tiles
# are 4,096 queries, so larger blocks are no faster).
BLOCK_ROWS = 1 << 13


@dataclass(frozen=True)
class RowSet:
    """The rows ``rows`` (sorted positions in the parts' concatenation; None: all of them)
    of the (N_i, D) arrays ``parts``, read part by part, never concatenated."""

    parts: Sequence[np.ndarray]
    rows: np.ndarray | None = None

    @classmethod
    def of(cls, vectors: RowSet | np.ndarray) -> RowSet:
        return vectors if isinstance(vectors, RowSet) else cls([np.asarray(vectors)])

    def __post_init__(self) -> None:
        if self.rows is not None and len(self.rows):
            if np.any(np.diff(self.rows) <= 0):
                raise ValueError("RowSet rows must be sorted and distinct")
            if self.rows[0] < 0 or self.rows[-1] >= self._offsets[-1]:
                raise ValueError(f"RowSet rows {self.rows[0]}..{self.rows[-1]} are not all within the parts' "
                                 f"{self._offsets[-1]} rows")

    @property
    def _offsets(self) -> np.ndarray:
        return np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self.rows is None else len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.parts[0].shape[1]) if self.parts else 0

    def subset(self, positions: np.ndarray) -> RowSet:
        """The rows at ``positions`` (sorted, among this set's rows)."""
        positions = np.asarray(positions, dtype=np.int64)
        return RowSet(self.parts, positions if self.rows is None else self.rows[positions])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), D) float32: the rows at sorted ``positions`` among this set's rows."""
        return np.concatenate(list(self._blocks(self.subset(positions).rows))
                              or [np.zeros((0, self.dim), np.float32)])

    def blocks(self) -> Iterator[np.ndarray]:
        """The rows in order as contiguous float32 blocks of at most BLOCK_ROWS rows."""
        yield from self._blocks(self.rows)

    def _blocks(self, rows: np.ndarray | None) -> Iterator[np.ndarray]:
        offsets, size = self._offsets, BLOCK_ROWS
        if rows is not None:  # only the parts that hold some of the rows (a gather may touch few of many)
            bounds = np.searchsorted(rows, offsets)
            touched = np.flatnonzero(bounds[1:] > bounds[:-1])
        for i in range(len(self.parts)) if rows is None else touched:
            part = self.parts[i]
            if rows is None:
                local = None
            else:
                local = rows[bounds[i]:bounds[i + 1]] - offsets[i]
            count = len(part) if local is None else len(local)
            for start in range(0, count, size):
                block = part[start:start + size] if local is None else part[local[start:start + size]]
                yield np.ascontiguousarray(block, dtype=np.float32)


def return_freed_memory() -> None:
    """Hand the heap pages that a dropped faiss index freed back to the OS (glibc's
    ``malloc_trim``; nothing elsewhere). glibc keeps them for the process's later ``malloc``
    calls, which Arrow's allocator (mimalloc) never makes, so after dedup the driver would
    hold the index's RAM through the manifest (measured: 147 MB at 400k x 64 copy descriptors)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def faiss_gpu_count() -> int:
    """GPUs this process's faiss can use (0 for a CPU build, or where none is visible)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def faiss_has_gpu_support() -> bool:
    """Whether faiss was built with GPU support (faiss-gpu), whatever GPUs this process sees:
    a driver on a CPU head node sees none, the GPU workers of its cluster do."""
    return hasattr(faiss, "StandardGpuResources")


@dataclass
class IpIndex:
    """An inner-product faiss index over ``base``; ``error`` (D,) bounds, per dimension, how far
    a stored vector's decoded value may be from its true one (None: stored exactly)."""

    index: faiss.Index
    base: RowSet
    error: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, exact_above: float = -np.inf,
               first_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (B, k), best first. Every similarity that could be at or
        above ``exact_above`` is exact: those of compressed vectors that may be are computed again
        from ``base``. ``first_row``: where the queries are base rows in order, the first one's row
        (a query's match with itself is then computed from the query, not read again)."""
        sims, idx = self.index.search(queries, k)
        if self.error is None:
            return sims, idx
        slack = np.abs(queries) @ self.error  # (B,) the most a decoded similarity can be off
        doubt = (idx >= 0) & (sims >= exact_above - slack[:, None])
        if first_row is not None:
            itself = idx == np.arange(first_row, first_row + len(queries))[:, None]
            sims[itself] = np.broadcast_to(np.einsum("bd,bd->b", queries, queries)[:, None], idx.shape)[itself]
            doubt &= ~itself
        pair_rows, pair_cols = np.nonzero(doubt)
        for start in range(0, len(pair_rows), BLOCK_ROWS):  # at most a block of vectors gathered at once
            r, c = pair_rows[start:start + BLOCK_ROWS], pair_cols[start:start + BLOCK_ROWS]
            wanted, where = np.unique(idx[r, c], return_inverse=True)
            sims[r, c] = np.einsum("nd,nd->n", queries[r], self.base.take(wanted)[where.ravel()])
        order = np.argsort(-sims, axis=1, kind="stable")
        return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def build_ip_index(base: RowSet | np.ndarray, seed: int = 0) -> IpIndex:
    """An inner-product index over the (N, D) vectors ``base``, filled block by block: exact
    (flat) up to FLAT_MAX vectors, IVF with 8-bit codes above (see the module's docstring)."""
    base = RowSet.of(base)
    n, d = len(base), base.dim
    if n > FLAT_MAX:
        nlist = int(4 * np.sqrt(n))
        rng = np.random.default_rng(seed)
        drawn = base.take(np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False)))
        sample = drawn[np.isfinite(drawn).all(axis=1)]  # faiss refuses a NaN; add_core skips its row
        del drawn
        if len(sample) == 0:
            raise ValueError(f"none of the vectors sampled from the {n} to index is finite (NaN or infinite)")
        nlist = min(nlist, len(sample))  # a pool of mostly NaN rows: fewer lists
        ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, _SQ_TYPE, faiss.METRIC_INNER_PRODUCT)
        # Only the lists' centroids are trained on the sample, as ivf.train would (its clustering
        # settings); the codes' ranges come from every row, so ivf.train's copy of the sample's
        # residuals is not needed.
        faiss.Clustering(d, nlist, ivf.cp).train(sample, ivf.quantizer)
        del sample
        lists, error = _code_ranges(ivf, base)
        ivf.is_trained = True
        ivf.nprobe = 16
        _fill_ivf(ivf, base, lists)
        return IpIndex(ivf, base, error)
    index: faiss.Index = faiss.IndexFlatIP(d)
    if faiss_gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    else:
        # Reserve the whole vector store up front: grown add by add, each reallocation
        # holds the old and the new store at once (peak 1.5x the index, measured).
        index.codes.resize(n * d * 4)
        index.codes.resize(0)
    for block in base.blocks():
        index.add(block)
    return IpIndex(index, base)


def _code_ranges(index: faiss.IndexIVFScalarQuantizer, base: RowSet) -> tuple[np.ndarray, np.ndarray]:
    """Each row's inverted list (N,), and the codes' per-dimension error bound (D,) once their
    ranges are set to those of every residual (ranges from a sample would clip the values
    outside them, past any bound). One pass over ``base``; the lists are 8 bytes a row."""
    centroids = index.quantizer.reconstruct_n(0, index.nlist)
    lists, low, high = [], np.full(base.dim, np.inf, np.float32), np.full(base.dim, -np.inf, np.float32)
    for block in base.blocks():
        found = index.quantizer.search(block, 1)[1][:, 0]
        # -1: a NaN row, which add_core skips. An infinite one is stored clipped, outside any
        # bound, and sets no range (embed_rows rejects such embeddings; copy descriptors are finite).
        valid = (found >= 0) & np.isfinite(block).all(axis=1)
        if valid.any():
            residual = block[valid] - centroids[found[valid]]
            np.minimum(low, residual.min(axis=0), out=low)
            np.maximum(high, residual.max(axis=0), out=high)
        lists.append(found)
    span = np.maximum(high - low, 1e-12).astype(np.float32)  # finite: the sample's finite rows are here too
    faiss.copy_array_to_vector(np.concatenate([low, span]), index.sq.trained)
    # A code decodes to the middle of its 1/255 of the range: off by at most half of that, plus
    # float32 rounding of the sums faiss and numpy make.
    return np.concatenate(lists), (span / 510.0 * 1.001 + 1e-6).astype(np.float32)


def _fill_ivf(index: faiss.IndexIVF, base: RowSet, lists: np.ndarray) -> None:
    """Add ``base`` to a trained IVF index, row i to list ``lists[i]``, with every inverted list
    reserved at its final size: grown add by add, a list's store doubles as it fills and the
    index peaks at ~1.65x its vectors (measured at 400k x 64). Rows are not quantized again."""
    invlists = faiss.downcast_InvertedLists(index.invlists)
    sizes = np.bincount(lists[lists >= 0], minlength=index.nlist)  # -1: a NaN row, which add_core skips
    for list_no in np.flatnonzero(sizes):
        invlists.resize(int(list_no), int(sizes[list_no]))  # allocates the capacity, which the next
        invlists.resize(int(list_no), 0)                     # resize keeps (a std::vector never shrinks)
    start = 0
    for block in base.blocks():
        block_lists = np.ascontiguousarray(lists[start:start + len(block)])
        index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(block_lists))
        start += len(block)


def search_blocks(index: IpIndex, queries: RowSet | np.ndarray, k: int,
                  exact_above: float = -np.inf) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query row, similarities, indices) per block of queries, each (B, k); a missing
    neighbour has index -1. A caller that keeps only some neighbours never holds all (Q, k).
    ``exact_above``: see :meth:`IpIndex.search`; queries that are the index's own base are
    searched as its rows."""
    start = 0
    queries = RowSet.of(queries)
    for block in queries.blocks():
        sims, idx = index.search(block, k, exact_above, start if queries is index.base else None)
        yield start, sims, idx
        start += len(block)


def knn_search(base: RowSet | np.ndarray, queries: RowSet | np.ndarray, k: int,
               log: Callable[[str], None] | None = None, what: str = "k-NN search") -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Q, k), exact similarities best first; missing neighbours
    have index -1. Over a compressed index the k are the best of 2k candidates, re-ranked.
    ``log`` gets progress lines on a long search, each starting with ``what``
    (:class:`~data_curation.progress.Progress`)."""
    base, queries = RowSet.of(base), RowSet.of(queries)
    if len(base) == 0 or len(queries) == 0 or k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    index = build_ip_index(base)
    candidates = min(k if index.error is None else 2 * k, len(base))
    found = []
    progress = Progress(log, what, len(queries), "queries searched")  # from here: the index is built
    for start, s, i in search_blocks(index, queries, candidates):
        found.append((s[:, :k], i[:, :k]))
        progress(start + len(s))
    del index
    return_freed_memory()
    return np.concatenate([s for s, _ in found]), np.concatenate([i for _, i in found])
