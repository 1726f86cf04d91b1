"""Inner-product k-NN with faiss: exact for small pools, IVF for large ones, GPU when there is one."""
from __future__ import annotations

import faiss
import numpy as np

# Above this many base vectors an exact (flat) search is replaced by an IVF index.
FLAT_MAX = 200_000


def faiss_gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def build_ip_index(base: np.ndarray, seed: int = 0) -> faiss.Index:
    """An inner-product index over ``base`` (N, D) float32."""
    base = np.ascontiguousarray(base, dtype=np.float32)
    n, d = base.shape
    if n <= FLAT_MAX:
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = base[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
        index.train(train)
        index.nprobe = 16
    if faiss_gpu_count() > 0 and n <= FLAT_MAX:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(base)
    return index


def knn_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (Q, k); missing neighbours have index -1."""
    if len(base) == 0 or len(queries) == 0 or k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    index = build_ip_index(base)
    sims, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(base)))
    return sims, idx
