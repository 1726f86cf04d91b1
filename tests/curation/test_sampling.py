import numpy as np
import pytest

from data_curation.sampling import balanced_sample, cap_split, resolve_target


@pytest.mark.parametrize("sizes,target", [
    ([10, 1, 5, 100], 20),
    ([3, 3, 3], 9),
    ([50, 2, 2, 2, 2], 12),
    ([7], 5),
    ([5, 5, 5, 5], 7),
    ([100, 40, 3, 0, 9], 61),
])
def test_cap_rule_on_hand_made_children(sizes, target):
    sizes = np.array(sizes)
    alloc = cap_split(sizes, target, np.random.default_rng(0))
    assert alloc.sum() == min(target, sizes.sum())
    assert (alloc <= sizes).all() and (alloc >= 0).all()
    cap = alloc[alloc < sizes].min() if (alloc < sizes).any() else None
    if cap is not None:  # children under the cap give everything; the others get c or c + 1
        assert (alloc[sizes <= cap] == sizes[sizes <= cap]).all()
        assert set(alloc[alloc < sizes]) <= {cap, cap + 1}


def test_cap_rule_example_from_the_paper_shape():
    alloc = cap_split(np.array([10, 1, 5, 100]), 20, np.random.default_rng(0))
    assert alloc.tolist() == [7, 1, 5, 7]  # cap 7: 7 + 1 + 5 + 7 = 20


def _tree() -> np.ndarray:
    """(N, 2): level-1 cluster and level-2 cluster of every point of a hand-made tree.

    Top cluster 0 holds leaves 0 (60 points) and 1 (30); top cluster 1 holds leaves 2 (5)
    and 3 (5): one top cluster holds 90% of the points.
    """
    leaf = np.repeat([0, 1, 2, 3], [60, 30, 5, 5])
    top = np.array([0, 0, 1, 1])[leaf]
    return np.stack([leaf, top], axis=1)


def test_hierarchical_sample_splits_top_down():
    levels = _tree()
    picked = balanced_sample(levels, 20, seed=0)
    assert len(picked) == 20 and len(np.unique(picked)) == 20
    leaf_counts = np.bincount(levels[picked, 0], minlength=4)
    # top: caps 10 each (both tops have >= 10); top 1 gives its 10 points, top 0 splits 5/5.
    assert leaf_counts.tolist() == [5, 5, 5, 5]


def test_leaves_weighting_gives_each_leaf_an_equal_cap():
    levels = np.stack([np.repeat(np.arange(4), 10), np.array([0, 0, 0, 1]).repeat(10)], axis=1)
    equal = np.bincount(levels[balanced_sample(levels, 8, seed=0, weighting="equal"), 0], minlength=4)
    leaves = np.bincount(levels[balanced_sample(levels, 8, seed=0, weighting="leaves"), 0], minlength=4)
    assert equal[3] == 4 and leaves.tolist() == [2, 2, 2, 2]


def test_sample_is_deterministic_under_a_seed_and_changes_with_it():
    levels = _tree()
    a, b = balanced_sample(levels, 30, seed=3), balanced_sample(levels, 30, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, balanced_sample(levels, 30, seed=4))


def test_closest_pick_takes_points_nearest_the_centroid():
    levels = np.zeros((10, 1), dtype=np.int64)
    distance = np.arange(10, dtype=np.float32)[::-1].copy()
    assert balanced_sample(levels, 3, leaf_pick="closest", distance=distance).tolist() == [7, 8, 9]


def test_target_as_count_or_fraction():
    assert resolve_target(0.25, 200) == 50
    assert resolve_target(30, 200) == 30
    assert resolve_target(500, 200) == 200
    assert resolve_target(1.0, 200) == 200 and resolve_target(1, 200) == 1  # a fraction of all; one image
    with pytest.raises(ValueError, match="must be in"):
        resolve_target(1.5, 200)
    assert resolve_target(0.003, 200) == 1
    with pytest.raises(ValueError, match="0.002 of 200 images is less than one image"):
        resolve_target(0.002, 200)  # not an empty selection


def test_balance_of_an_empty_selection_is_zero_not_perfect():
    from data_curation.manifest import normalized_entropy

    assert normalized_entropy(np.zeros(0, dtype=np.int64), 16) == 0.0
    assert normalized_entropy(np.array([3, 3, 3]), 4) == 0.0 and normalized_entropy(np.array([3]), 1) == 1.0
    assert normalized_entropy(np.array([0, 1, 2, 3]), 4) == pytest.approx(1.0)
