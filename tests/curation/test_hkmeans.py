import numpy as np

from data_curation.hkmeans import (
    KMeansParams,
    LevelSpec,
    assign,
    closest_per_cluster,
    cluster_means,
    fit_hierarchy,
    kmeans_plus_plus,
    training_rows,
)


def _blobs(n: int = 3000, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d)) * 5
    return (centres[rng.integers(12, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


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


def test_cluster_means_is_one_lloyd_update_and_keeps_empty_clusters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    labels = rng.integers(0, 12, size=500)
    labels[labels == 4] = 5  # cluster 4 has no points
    centroids = rng.normal(size=(12, 6)).astype(np.float32)
    moved = cluster_means(x, labels, centroids)
    for j in range(12):
        expected = centroids[j] if j == 4 else x[labels == j].mean(axis=0)
        np.testing.assert_allclose(moved[j], expected, atol=1e-6)
