"""Balanced sampling from a cluster hierarchy, top-down with the cap rule (Vo et al. 2024).

To draw N points from a node whose children hold n_i points, find the cap c with
Σ min(n_i, c) = N, give each child min(n_i, c) and the remainder +1 to random children
still above the cap, then recurse into each child; a level-1 cluster finally gives its
share as random points or as the points closest to its centroid.

``weighting="leaves"`` scales each child's cap by the number of level-1 clusters below
it (Σ min(n_i, c·w_i) = N). Plain Vo et al. (``"equal"``) gives every child of a node the
same cap, so when one top cluster holds most of the data's variety (REFERENCE §4: one of
10 top clusters held 88-99% of the points) all of that variety shares one tenth of the
budget. Weighting by leaves keeps the budget per level-1 cluster even, while the
top-down order still decides where the budget of small clusters goes (to their siblings
first). Both are measured in bench/curation_quality.py.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

Weighting = Literal["equal", "leaves"]
LeafPick = Literal["random", "closest"]


def cap_split(sizes: np.ndarray, target: int, rng: np.random.Generator,
              weights: np.ndarray | None = None) -> np.ndarray:
    """How many of ``target`` each child gets: min(n_i, floor(c·w_i)) for the largest cap c
    that does not overshoot, plus one each for randomly chosen children still above it."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w = np.ones(len(sizes)) if weights is None else np.asarray(weights, dtype=np.float64)
    target = int(min(max(target, 0), sizes.sum()))
    if target == 0 or len(sizes) == 0:
        return np.zeros(len(sizes), dtype=np.int64)

    def share(cap: float) -> np.ndarray:
        return np.minimum(sizes, np.floor(cap * w + 1e-9).astype(np.int64))

    low, high = 0.0, float(np.max(sizes / w)) + 1.0
    if weights is None:  # integer caps: an exact binary search
        lo, hi = 0, int(sizes.max())
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if share(mid).sum() <= target else (lo, mid - 1)
        alloc = share(lo)
    else:
        for _ in range(100):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if share(mid).sum() <= target else (low, mid)
        alloc = share(low)
    remainder = target - int(alloc.sum())
    if remainder > 0:
        open_children = np.flatnonzero(alloc < sizes)
        alloc[rng.choice(open_children, size=remainder, replace=False)] += 1
    return alloc


def balanced_sample(levels: np.ndarray, target: int, seed: int = 0, *, leaf_pick: LeafPick = "random",
                    distance: np.ndarray | None = None, weighting: Weighting = "equal") -> np.ndarray:
    """Row indices (sorted) of a balanced sample of ``target`` rows.

    ``levels`` is (N, L): column l holds each row's cluster id at level l+1 (column 0 = the
    level-1 cluster). ``distance`` (N,) to the level-1 centroid is needed for ``closest``.
    """
    levels = np.asarray(levels, dtype=np.int64)
    if leaf_pick == "closest" and distance is None:
        raise ValueError("leaf_pick='closest' needs the distance of each row to its level-1 centroid")
    rng = np.random.default_rng(seed)
    picked: list[np.ndarray] = []

    def take_from_leaf(rows: np.ndarray, count: int) -> None:
        if leaf_pick == "closest":
            picked.append(rows[np.argsort(distance[rows], kind="stable")[:count]])
        else:
            picked.append(rng.choice(rows, size=count, replace=False))

    def split(rows: np.ndarray, column: int, budget: int) -> None:
        if column < 0:
            take_from_leaf(rows, budget)
            return
        ids, inverse = np.unique(levels[rows, column], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        sizes = np.bincount(inverse, minlength=len(ids))
        groups = np.split(rows[order], np.cumsum(sizes)[:-1])
        weights = None
        if weighting == "leaves" and column > 0:
            weights = np.array([len(np.unique(levels[g, 0])) for g in groups], dtype=np.float64)
        alloc = cap_split(sizes, budget, rng, weights)
        for group, count in zip(groups, alloc, strict=True):
            if count > 0:
                split(group, column - 1, int(count))

    if len(levels) and target > 0:
        split(np.arange(len(levels)), levels.shape[1] - 1, int(min(target, len(levels))))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def resolve_target(target: int | float, available: int) -> int:
    """A target given as a count (an int) or a fraction of ``available`` (a float in (0, 1]), as a
    count; a fraction that rounds to no image at all is an error, not an empty selection."""
    if isinstance(target, float):
        if not 0 < target <= 1:
            raise ValueError(f"a sampling target given as a fraction must be in (0, 1], not {target}")
        count = int(round(target * available))
        if count == 0 and available:
            raise ValueError(f"a sampling target of {target} of {available} images is less than one image; "
                             f"give a larger fraction or a count")
    else:
        count = int(target)
    return max(0, min(count, available))
