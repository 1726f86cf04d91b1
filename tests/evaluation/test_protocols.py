"""k-NN, linear probe and retrieval on synthetic features: near-perfect when separable, chance when not."""
import numpy as np
import pytest

from models.evaluation.knn import cosine_spread, knn_classify
from models.evaluation.linear_probe import linear_probe
from models.evaluation.report import TIED_SPREAD
from models.evaluation.retrieval import copy_detection, retrieval_map


def separable(n_per_class=60, n_classes=8, dim=32, seed=0):
    """Gaussian blobs around well-separated class centres; returns train/test halves."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 5
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    x, labels = x[order].astype(np.float32), labels[order]
    half = len(labels) // 2
    return x[:half], labels[:half], x[half:], labels[half:]


def random_labels(n=600, n_classes=8, dim=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, n_classes, size=n)
    return x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:]


def test_knn_is_near_perfect_on_separable_features():
    out = knn_classify(*separable())
    assert set(out) == {"knn_k10_top1", "knn_k10_top5", "knn_k20_top1", "knn_k20_top5"}
    assert out["knn_k10_top1"] > 0.97 and out["knn_k20_top1"] > 0.97
    assert out["knn_k20_top5"] >= out["knn_k20_top1"]


def test_knn_is_at_chance_on_random_labels():
    out = knn_classify(*random_labels())
    assert abs(out["knn_k20_top1"] - 1 / 8) < 0.08
    assert abs(out["knn_k20_top5"] - 5 / 8) < 0.12


def test_knn_reports_top5_only_with_more_than_five_classes():
    x_tr, y_tr, x_te, y_te = separable(n_classes=3)
    out = knn_classify(x_tr, y_tr, x_te, y_te, ks=(10,))
    assert set(out) == {"knn_k10_top1"}


def test_knn_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    x_tr, x_te = rng.normal(size=(50, 6)), rng.normal(size=(7, 6))
    y_tr, y_te = rng.integers(0, 3, 50), rng.integers(0, 3, 7)
    a = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True)
    b = x_te / np.linalg.norm(x_te, axis=1, keepdims=True)
    sims = b @ a.T
    predictions = []
    for row in sims:
        top = np.argsort(-row)[:5]
        votes = np.zeros(3)
        np.add.at(votes, y_tr[top], np.exp(row[top] / 0.07))
        predictions.append(votes.argmax())
    expected = float(np.mean(np.array(predictions) == y_te))
    # batch_size 3 also checks that batches are stitched together right
    assert knn_classify(x_tr, y_tr, x_te, y_te, ks=(5,), batch_size=3)["knn_k5_top1"] == pytest.approx(expected)


def test_linear_probe_is_near_perfect_on_separable_features():
    out = linear_probe(*separable())
    assert out["linear_top1"] > 0.97
    assert out["linear_weight_decay"] in (1e-4, 1e-3, 1e-2, 1e-1)


def test_linear_probe_is_at_chance_on_random_labels():
    out = linear_probe(*random_labels())
    assert abs(out["linear_top1"] - 1 / 8) < 0.08


def test_retrieval_map_is_one_for_separable_and_low_for_random():
    x_tr, y_tr, x_te, y_te = separable()
    assert retrieval_map(x_tr, y_tr, x_te, y_te)["retrieval_map"] > 0.97
    x_tr, y_tr, x_te, y_te = random_labels()
    assert retrieval_map(x_tr, y_tr, x_te, y_te)["retrieval_map"] < 0.2


def test_retrieval_map_of_a_known_ranking():
    database = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 1, 0])
    # the query ranks the database 0, 1, 2: relevant at ranks 1 and 3 -> AP = (1 + 2/3) / 2
    out = retrieval_map(database, labels, np.array([[1.0, 0.01]]), np.array([0]))
    assert out["retrieval_map"] == pytest.approx((1 + 2 / 3) / 2)


def test_copy_detection_finds_near_copies_and_not_random_ones():
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(40, 16))
    distractors = rng.normal(size=(200, 16))
    near = copy_detection(originals + 0.05 * rng.normal(size=originals.shape), originals, distractors)
    assert near["copy_recall1"] == 1.0 and near["copy_map"] == 1.0
    unrelated = copy_detection(rng.normal(size=(40, 16)), originals, distractors)
    assert unrelated["copy_recall1"] < 0.2


def test_cosine_spread_tells_features_from_rows_alike_to_within_rounding():
    train, y_train, test, y_test = separable()
    assert cosine_spread(train) > 0.1
    # The same features shrunk onto one unit vector: k-NN in float32 tells them apart at a spread of
    # 3.5e-6 and is at chance at 3.5e-10, which TIED_SPREAD (1e-8) calls ties.
    rng = np.random.default_rng(0)
    common = rng.normal(size=32)
    common /= np.linalg.norm(common)
    for scale, tied in ((1e-4, False), (1e-6, True)):
        shrunk_train, shrunk_test = ((common + scale * x).astype(np.float32) for x in (train, test))
        assert (cosine_spread(shrunk_train) < TIED_SPREAD) == tied
        top1 = knn_classify(shrunk_train, y_train, shrunk_test, y_test)["knn_k10_top1"]
        assert top1 < 0.3 if tied else top1 == 1.0
    # Past `pairs`, a seeded sample of pairs: close to every pair.
    many = np.concatenate([separable(seed=s)[0] for s in range(4)])  # 960 rows, 460k pairs
    assert cosine_spread(many, pairs=20_000) == pytest.approx(cosine_spread(many, pairs=10**6), rel=0.05)
    assert cosine_spread(many, pairs=20_000, block=512) == pytest.approx(cosine_spread(many, pairs=20_000))
    assert cosine_spread(many[:1]) == 0.0
