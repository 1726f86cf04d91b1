import numpy as np
import pytest

from data_curation.hkmeans import (
    KMeansParams,
    LevelSpec,
    assign,
    closest_per_cluster,
    fit_hierarchy,
    kmeans_plus_plus,
    training_rows,
)
from data_curation.manifest import normalized_entropy
from data_curation.sampling import balanced_sample


def _labelled_blobs(n: int = 3000, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points of 12 far-apart Gaussian blobs, and the blob of each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d)) * 5
    blob = rng.integers(12, size=n)
    return (centres[blob] + rng.normal(size=(n, d))).astype(np.float32), blob


def _blobs(n: int = 3000, d: int = 16, seed: int = 0) -> np.ndarray:
    return _labelled_blobs(n, d, seed)[0]


PARAMS = KMeansParams(levels=(LevelSpec(24, 2), LevelSpec(6, 2), LevelSpec(2, 1)), iterations=5, seed=7)


def test_hierarchy_is_deterministic_under_a_seed():
    x = _blobs()
    a, b = fit_hierarchy(x, PARAMS), fit_hierarchy(x, PARAMS)
    for ca, cb in zip(a.centroids, b.centroids, strict=True):
        assert np.array_equal(ca, cb)
    assert np.array_equal(assign(x, a.centroids[0])[0], assign(x, b.centroids[0])[0])
    other = fit_hierarchy(x, KMeansParams(levels=PARAMS.levels, iterations=5, seed=8))
    assert not np.array_equal(a.centroids[0], other.centroids[0])


def test_levels_nest():
    x = _blobs()
    hierarchy = fit_hierarchy(x, PARAMS)
    assert [len(c) for c in hierarchy.centroids] == [24, 6, 2]
    levels = hierarchy.levels_of(assign(x, hierarchy.centroids[0])[0])
    assert levels.shape == (len(x), 3)
    for level in range(2):  # every cluster has exactly one parent
        pairs = np.unique(levels[:, level:level + 2], axis=0)
        assert len(np.unique(pairs[:, 0])) == len(pairs)


def test_kmeans_plus_plus_picks_distinct_far_points():
    x = np.array([[0, 0], [0, 0.1], [10, 10], [-10, 10]], dtype=np.float32)
    centres = kmeans_plus_plus(x, 3, np.random.default_rng(0))
    assert {tuple(c) for c in centres[1:]} | {tuple(centres[0])} >= {(10.0, 10.0), (-10.0, 10.0)}


def test_kmeans_plus_plus_takes_every_point_once_when_k_is_the_point_count():
    # Rounds draw many centres at once; a row drawn twice in a round, or one already a centre
    # (at distance 0), must not become a second centre while other rows are still uncovered.
    x = np.random.default_rng(1).normal(size=(300, 4)).astype(np.float32)
    centres = kmeans_plus_plus(x, 300, np.random.default_rng(0))
    assert len(np.unique(centres, axis=0)) == 300


def test_kmeans_plus_plus_never_draws_a_row_that_is_not_finite():
    # faiss puts a NaN row nowhere at the greatest distance: weighted by it, every round drew it.
    x = np.random.default_rng(2).normal(size=(2000, 4)).astype(np.float32)
    x[[5, 700, 1999]] = np.nan
    x[11, 2] = np.inf
    centres = kmeans_plus_plus(x, 200, np.random.default_rng(0))
    assert np.isfinite(centres).all() and len(np.unique(centres, axis=0)) == 200
    with pytest.raises(ValueError, match="none of the 3 points is finite"):
        kmeans_plus_plus(np.full((3, 2), np.nan, dtype=np.float32), 2, np.random.default_rng(0))


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_plus_plus_rounds_seed_every_separated_blob(seed):
    # 12 far-apart blobs and 24 seeds: a blob without a seed holds nearly all the squared
    # distance, so k-means++ gives every blob one; drawing in rounds must keep that.
    x, blob = _labelled_blobs(seed=seed)
    centres = kmeans_plus_plus(x, 24, np.random.default_rng(seed))
    rows = assign(centres, x)[0]  # each centre is a row of x
    assert len(np.unique(blob[rows])) == 12


class _Draws:
    """Fixed draws for k-means++: the first row as the first centre, then u for every pick."""

    def __init__(self, u: float):
        self.u = u

    def integers(self, n: int, size: int | None = None) -> int | np.ndarray:
        return 0 if size is None else np.zeros(size, dtype=np.int64)

    def random(self, size: int) -> np.ndarray:
        return np.full(size, self.u)


def test_kmeans_plus_plus_draws_rows_after_a_far_one():
    # Squared distances to the first centre: 1e8 for row 1, then a million rows at 1 and a last
    # row at 0 (the centre itself). A float32 running sum stays at 1e8 after row 1, so a draw
    # in the last 1% of the total fell past its end and took the last row: the centre again.
    x = np.ones((1_000_003, 1), dtype=np.float32)
    x[0] = x[-1] = 0.0
    x[1] = 1e4
    centres = kmeans_plus_plus(x, 2, _Draws(0.999))
    assert centres[1, 0] == 1.0


def test_closest_per_cluster_keeps_the_nearest():
    labels = np.array([0, 0, 0, 1, 1])
    dist = np.array([3.0, 1.0, 2.0, 5.0, 4.0], dtype=np.float32)
    assert closest_per_cluster(labels, dist, 1).tolist() == [1, 4]
    assert closest_per_cluster(labels, dist, 2).tolist() == [1, 2, 3, 4]


def test_level_one_trains_on_an_explicit_capped_sample():
    params = KMeansParams(levels=(LevelSpec(10),), max_points_per_centroid=20, seed=0)
    rows = training_rows(1000, params)
    assert len(rows) == 200 and np.array_equal(rows, np.sort(rows))
    assert np.array_equal(rows, training_rows(1000, params))
    assert len(training_rows(150, params)) == 150


def _zipf_mixture(components: int, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of well-separated Gaussians whose sizes follow a Zipf law, and their component."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(components, d))
    weights = 1.0 / np.arange(1, components + 1)
    component = np.repeat(np.arange(components), np.maximum(1, np.round(n * weights / weights.sum())).astype(int))
    x = centres[component] + 0.35 * rng.normal(size=(len(component), d))
    return x.astype(np.float32), component


@pytest.mark.parametrize("seed", [0, 2])
def test_resampling_steps_spread_level1_clusters_over_the_support(seed):
    # Vo et al. §4: resampling moves centroids from the density toward a uniform cover, so an
    # equal pick per level-1 cluster covers the mixture's components more evenly than plain
    # k-means (whose centroids crowd the big components). Warm-started steps did not move at all.
    x, component = _zipf_mixture(100, 10000, 16, seed)

    def balance(steps: int) -> float:
        params = KMeansParams(levels=(LevelSpec(100, steps),), seed=seed)
        labels = assign(x, fit_hierarchy(x, params).centroids[0])[0]
        pick = balanced_sample(labels[:, None], len(x) // 10, seed)
        return normalized_entropy(component[pick], 100)

    plain, resampled = balance(0), balance(3)
    assert resampled >= 0.95 and resampled >= plain + 0.02, (plain, resampled)


def test_fewer_distinct_points_than_clusters_still_fit():
    # Identical embeddings (a pool of blank images) leave one non-empty cluster: a resampling step
    # would keep fewer points than clusters, which faiss refuses; the level keeps its k centroids.
    x = np.ones((50, 8), dtype=np.float32)
    hierarchy = fit_hierarchy(x, KMeansParams(levels=(LevelSpec(20, 3), LevelSpec(4, 2)), seed=0))
    assert [c.shape for c in hierarchy.centroids] == [(20, 8), (4, 8)]
    assert (assign(x, hierarchy.centroids[0])[1] < 1e-6).all()


def test_a_level_too_narrow_to_resample_skips_its_steps():
    # 24 centroids into 12 clusters keep one point per cluster in a resampling step: its fresh
    # k-means would only move each centroid onto its nearest point (all 12 of them were level-1
    # centroids before); the steps are skipped and the level's centroids stay means.
    x = _blobs()
    params = KMeansParams(levels=(LevelSpec(24, 2), LevelSpec(12, 3), LevelSpec(3, 2)), iterations=5, seed=7)
    hierarchy = fit_hierarchy(x, params)
    assert hierarchy.resampling_steps_run == [2, 0, 2]
    below = {tuple(row) for row in hierarchy.centroids[0]}
    assert sum(tuple(row) in below for row in hierarchy.centroids[1]) < 12
