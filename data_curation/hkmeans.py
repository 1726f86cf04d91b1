"""Balanced hierarchical k-means (Vo et al. 2024) with faiss.

Level 1 clusters the points; level l+1 clusters the centroids of level l. Each level:

1. k-means++ seeding on a random subset (``init_points_per_centroid`` x k points), drawn
   in rounds of many centres (:func:`kmeans_plus_plus`), so seeding costs a small fraction
   of one Lloyd pass;
2. ``iterations`` Lloyd iterations (faiss) on the level's training points;
3. ``resampling_steps`` times: assign every training point, keep the s points closest
   to each centroid (s = half the mean cluster size), and run a fresh k-means on those
   points only: a new k-means++ seeding (again on a subset) and ``resample_iterations``
   Lloyd iterations. The kept set holds the same number of points near every centroid,
   so its density is flat across clusters; seeding anew on it lets centroids leave dense
   regions for sparse ones, toward a uniform cover of the data's support instead of its
   density (Vo et al. §4). Warm-starting from the old centroids instead is a fixed point:
   each centroid is already the mean of its closest points, so nothing moves. Measured on
   the Zipf mixture of tests/curation/test_hkmeans.py, an equal pick per level-1 cluster
   covers the components at 0.92 of the maximum entropy with or without warm steps, 0.97
   with fresh ones; bench/kmeans.py reports the same figure for its shapes.
   A step needs s >= 2 (about 3 or more points per cluster): keeping one point per cluster,
   the fresh k-means has as many centres as points and only moves each centroid onto its
   nearest point, the same at every step. Such a level skips its steps and
   ``Hierarchy.resampling_steps_run`` says so; the upper levels of a narrow hierarchy
   (64 -> 32 clusters) are the usual case.

Level 1 trains on at most ``max_points_per_centroid`` x k1 points, drawn explicitly and
uniformly (faiss.Kmeans would subsample silently to the same cap); all points are then
assigned to the final level-1 centroids with :func:`assign`, which a caller may run chunk
by chunk or on many workers. Everything is deterministic under ``seed``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from data_curation.knn import faiss_gpu_count
from data_curation.progress import Progress, is_long

_ASSIGN_BATCH = 65536
MIN_RESAMPLE_SIZE = 2  # points kept per cluster below which a resampling step is skipped
_ROUND_GROWTH = 8  # a k-means++ round draws one centre per this many already chosen


@dataclass(frozen=True)
class LevelSpec:
    k: int
    resampling_steps: int = 0


@dataclass(frozen=True)
class KMeansParams:
    levels: tuple[LevelSpec, ...]
    iterations: int = 10
    resample_iterations: int = 1
    max_points_per_centroid: int = 256
    init_points_per_centroid: int = 8
    seed: int = 0


@dataclass
class Hierarchy:
    """centroids[l]: (k_l, D) for level l+1; parents[l]: (k_l,) the level-(l+2) cluster of
    each level-(l+1) cluster (one fewer entry than ``centroids``); resampling_steps_run[l]:
    the resampling steps level l+1 ran, fewer than asked where its points were too few."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray] = field(default_factory=list)
    resampling_steps_run: list[int] = field(default_factory=list)

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    def levels_of(self, level1: np.ndarray) -> np.ndarray:
        """(N,) level-1 ids -> (N, n_levels) ids at every level."""
        out = np.empty((len(level1), self.n_levels), dtype=np.int64)
        out[:, 0] = level1
        for level, parent in enumerate(self.parents):
            out[:, level + 1] = parent[out[:, level]]
        return out


def assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: (labels (N,) int64, squared distances (N,) float32)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if faiss_gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), _ASSIGN_BATCH):
        part = np.ascontiguousarray(x[start:start + _ASSIGN_BATCH], dtype=np.float32)
        d, i = index.search(part, 1)
        labels[start:start + len(part)] = i[:, 0]
        dist[start:start + len(part)] = d[:, 0]
    return labels, dist


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator,
                     log: Callable[[str], None] | None = None, what: str = "k-means") -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), drawn in rounds.

    Each next centre is a row drawn with probability proportional to its squared distance
    to the nearest centre so far. Drawn one centre per pass, the seeding is k memory-bound
    matrix-vector products in a row over ~8k rows: over a day at the k = 200,000 of the vit7b
    preset's level 1. So, as k-means|| (Bahmani et al. 2012) does, a round draws several
    rows from the same distances and then updates the distances against all of them with
    one faiss search, a matrix product (every core, or the GPUs). A round draws one row per
    ``_ROUND_GROWTH`` centres already chosen, at least one, so the first rounds are plain
    k-means++; k = 200,000 takes about 100 rounds. bench/kmeans_seeding.py measures it
    against one centre per pass: the time, and the inertia after seeding and after Lloyd.
    A round costs in proportion to the centres it draws, so ``log`` gets a line at most every
    interval with the centres drawn and the time left (:class:`~data_curation.progress.Progress`).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    finite = np.isfinite(x).all(axis=1)  # a row with a NaN or inf is never drawn (the pipeline rejects them)
    if not finite.any():
        raise ValueError(f"k-means++: none of the {n} points is finite")
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    rows = np.flatnonzero(finite)
    centres[0] = x[rows[rng.integers(len(rows))]]

    def sq_distances(new: np.ndarray) -> np.ndarray:
        # float64: a float32 running sum stops growing once it dwarfs the terms (the rows after
        # a far one could not be drawn), and the total is that same sum's last entry
        return np.where(finite, np.maximum(assign(x, new)[1], 0.0).astype(np.float64), 0.0)

    nearest = sq_distances(centres[:1])
    chosen = 1
    progress = Progress(log, f"{what}: k-means++ seeding", k, "centres")
    while chosen < k:
        progress(chosen)
        want = min(k - chosen, max(1, chosen // _ROUND_GROWTH))
        cumulative = np.cumsum(nearest)
        total = float(cumulative[-1])
        if total <= 0.0:  # fewer distinct points than k: repeat points; Lloyd handles empties
            picks = rows[rng.integers(len(rows), size=want)]
        else:  # a row drawn twice in a round is one centre; later rounds draw the rest
            picks = np.unique(np.minimum(np.searchsorted(cumulative, rng.random(want) * total, side="right"), n - 1))
        centres[chosen:chosen + len(picks)] = x[picks]
        np.minimum(nearest, sq_distances(centres[chosen:chosen + len(picks)]), out=nearest)
        chosen += len(picks)
    return centres


def _lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    if iterations <= 0:
        return centroids
    k, d = centroids.shape
    km = faiss.Kmeans(d, k, niter=iterations, seed=seed, gpu=faiss_gpu_count() > 0,
                      max_points_per_centroid=max(1, -(-len(x) // k)), min_points_per_centroid=1,
                      verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=np.ascontiguousarray(centroids))
    return np.asarray(km.centroids, dtype=np.float32).copy()


def _first_kmeans(x: np.ndarray, centroids: np.ndarray, iterations: int, seed: int,
                  log: Callable[[str], None] | None, what: str) -> np.ndarray:
    """A level's first ``iterations`` Lloyd passes. When the first pass shows that all of them
    will be long, the others run one at a time, with a progress line at most every interval
    (hours at the vit7b preset's level 1). One at a time or all in one faiss call, the
    centroids are the same: each call starts from the centroids it is given."""
    progress = Progress(log, f"{what}: first k-means", iterations, "Lloyd iterations")
    first = time.monotonic()
    centroids = _lloyd(x, centroids, min(1, iterations), seed)
    if log is None or not is_long((time.monotonic() - first) * iterations):
        return _lloyd(x, centroids, iterations - 1, seed)
    for done in range(1, iterations):
        progress(done)
        centroids = _lloyd(x, centroids, 1, seed)
    return centroids


def closest_per_cluster(labels: np.ndarray, dist: np.ndarray, per_cluster: int) -> np.ndarray:
    """Indices of the ``per_cluster`` rows nearest to their centroid in each cluster."""
    order = np.lexsort((dist, labels))  # by cluster, then by distance
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < per_cluster])


def resampling_sample_size(n: int, k: int) -> int:
    """The points a resampling step keeps per cluster, for ``n`` points in ``k`` clusters:
    half the mean cluster size (Vo et al.)."""
    return int(round(n / max(1, min(k, n)) / 2))


def fit_level(x: np.ndarray, spec: LevelSpec, params: KMeansParams, rng: np.random.Generator,
              log: Callable[[str], None] | None = None, what: str = "k-means") -> tuple[np.ndarray, int]:
    """The (k, D) centroids of one level trained on ``x`` (N, D), and the resampling steps run.
    ``log`` gets progress lines on a long fit, each starting with ``what``: the first k-means
    (seeding and ``iterations`` Lloyd passes): its seeding and passes as they go and a line when
    it is done, when it is long; then the resampling steps, which cost about the same each
    (:class:`~data_curation.progress.Progress`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(spec.k, len(x))
    start = time.monotonic()
    seeds = _seed(x, k, params, rng, log, what)
    centroids = _first_kmeans(x, seeds, params.iterations, int(rng.integers(2**31)), log, what)
    per_cluster = resampling_sample_size(len(x), k)
    steps = spec.resampling_steps if per_cluster >= MIN_RESAMPLE_SIZE else 0
    progress = Progress(log, what, steps, "resampling steps")
    if log is not None and is_long(seconds := time.monotonic() - start):
        log(f"{what}: first k-means done in {seconds:,.0f} s, {steps} resampling step{'s' * (steps != 1)} to go")
    for step in range(steps):
        labels, dist = assign(x, centroids)
        near = x[closest_per_cluster(labels, dist, per_cluster)]
        if len(near) < k:  # most clusters are empty (fewer distinct points than k): nothing to spread
            return centroids, step
        centroids = _lloyd(near, _seed(near, k, params, rng), params.resample_iterations, int(rng.integers(2**31)))
        progress(step + 1)
    return centroids, steps


def _seed(x: np.ndarray, k: int, params: KMeansParams, rng: np.random.Generator,
          log: Callable[[str], None] | None = None, what: str = "k-means") -> np.ndarray:
    """k-means++ seeds drawn from a random subset of ``init_points_per_centroid`` x k rows."""
    rows = rng.choice(len(x), size=min(len(x), params.init_points_per_centroid * k), replace=False)
    return kmeans_plus_plus(x[np.sort(rows)], k, rng, log, what)


def training_rows(n: int, params: KMeansParams) -> np.ndarray:
    """The sorted row indices level 1 trains on (all rows when n is under the cap)."""
    cap = params.max_points_per_centroid * params.levels[0].k
    if n <= cap:
        return np.arange(n)
    rng = np.random.default_rng([params.seed, 1])
    return np.sort(rng.choice(n, size=cap, replace=False))


def fit_hierarchy(train: np.ndarray, params: KMeansParams, log: Callable[[str], None] | None = None) -> Hierarchy:
    """Train all levels: level 1 on ``train`` (rows chosen by :func:`training_rows`), the
    others on the centroids of the level below. ``log`` gets progress lines on a long fit: those
    of :func:`fit_level`, and a line when a level that took longer than the interval between
    two lines (:class:`~data_curation.progress.Progress`) is done."""
    if not params.levels:
        raise ValueError("hierarchical k-means needs at least one level")
    rng = np.random.default_rng([params.seed, 2])

    def fit(number: int, x: np.ndarray) -> tuple[np.ndarray, int]:
        spec, start = params.levels[number - 1], time.monotonic()
        what = f"k-means level {number}/{len(params.levels)} (k = {spec.k:,}, {len(x):,} points)"
        fitted = fit_level(x, spec, params, rng, log, what)
        if log is not None and is_long(seconds := time.monotonic() - start):
            log(f"{what}: done in {seconds:,.0f} s")
        return fitted

    first, steps_run = fit(1, train)
    hierarchy = Hierarchy([first], resampling_steps_run=[steps_run])
    for number in range(2, len(params.levels) + 1):
        below = hierarchy.centroids[-1]
        level, steps_run = fit(number, below)
        hierarchy.parents.append(assign(below, level)[0])
        hierarchy.centroids.append(level)
        hierarchy.resampling_steps_run.append(steps_run)
    return hierarchy
