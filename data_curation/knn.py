"""Inner-product k-NN with faiss: exact for small pools, IVF for large ones, GPU when there is one.

Vectors come as a :class:`RowSet`: some rows of a list of (N_i, D) arrays, usually the
memory-mapped embedding chunks. Indexes are filled and searched one block at a time, so
besides the index itself (what faiss needs) only a block of vectors is ever in RAM.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

# Above this many base vectors an exact (flat) search is replaced by an IVF index.
FLAT_MAX = 200_000
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
        for i, part in enumerate(self.parts):
            if rows is None:
                local = None
            else:
                lo, hi = np.searchsorted(rows, offsets[i:i + 2])
                local = rows[lo:hi] - offsets[i]
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


def build_ip_index(base: RowSet | np.ndarray, seed: int = 0) -> faiss.Index:
    """An inner-product index over the (N, D) vectors ``base``, filled block by block."""
    base = RowSet.of(base)
    n, d = len(base), base.dim
    if n <= FLAT_MAX:
        index: faiss.Index = faiss.IndexFlatIP(d)
        if faiss_gpu_count() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        else:
            # Reserve the whole vector store up front: grown add by add, each reallocation
            # holds the old and the new store at once (peak 1.5x the index, measured).
            index.codes.resize(n * d * 4)
            index.codes.resize(0)
    else:
        nlist = int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        index.train(base.take(np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))))
        index.nprobe = 16
        _fill_ivf(index, base)
        return index
    for block in base.blocks():
        index.add(block)
    return index


def _fill_ivf(index: faiss.IndexIVF, base: RowSet) -> None:
    """Add ``base`` to a trained IVF index with every inverted list reserved at its final size:
    grown add by add, a list's store doubles as it fills and the index peaks at ~1.65x its
    vectors (measured at 400k x 64). The lists of all rows are found first (8 bytes a row),
    then each block is added with its lists, not quantized again."""
    lists = np.concatenate([index.quantizer.search(block, 1)[1][:, 0] for block in base.blocks()])
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


def search_blocks(index: faiss.Index, queries: RowSet | np.ndarray,
                  k: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query row, similarities, indices) per block of queries, each (B, k); a missing
    neighbour has index -1. A caller that keeps only some neighbours never holds all (Q, k)."""
    start = 0
    for block in RowSet.of(queries).blocks():
        sims, idx = index.search(block, k)
        yield start, sims, idx
        start += len(block)


def knn_search(base: RowSet | np.ndarray, queries: RowSet | np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Q, k); missing neighbours have index -1."""
    base, queries = RowSet.of(base), RowSet.of(queries)
    if len(base) == 0 or len(queries) == 0 or k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    found = list(search_blocks(build_ip_index(base), queries, min(k, len(base))))
    return_freed_memory()
    return np.concatenate([s for _, s, _ in found]), np.concatenate([i for _, _, i in found])
