"""k-means++ seeding drawn in rounds (data_curation.hkmeans) against one centre per pass.

Each level of the hierarchy seeds k centres by k-means++ on ``init_points_per_centroid``
(8) x k points. The baseline, measured in the same run on the same points, is textbook
k-means++ as vfm ran it before: one centre per pass, each pass a matrix-vector product
(numpy, with its own threads; vfm pinned them to one: as fast or slower here) over all
the points. The rounds draw many centres per pass and update the distances with one faiss
search. Both do about 8 k^2 d multiply-adds: the baseline as k memory-bound passes, the
rounds as ~100 matrix products (every core, or the GPUs), so the speed-up grows with k and
d until the points outgrow the caches. Quality: inertia (sum of squared distances to the nearest
centre) after seeding and after the same Lloyd iterations from those seeds, rounds /
baseline, mean over ``--repeats`` seeds (1.0 = the same; k-means++ alone swings by a few
percent between seeds).

Data: the Zipf-weighted mixture of 1000 Gaussians of bench/kmeans.py.

    python bench/kmeans_seeding.py [--k 1000 4000] [--dims 64 384] [--repeats 2]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kmeans import ITERATIONS, mixture  # noqa: E402
from data_curation.hkmeans import KMeansParams, _lloyd, assign, kmeans_plus_plus  # noqa: E402

POINTS_PER_CENTROID = KMeansParams(levels=()).init_points_per_centroid


def one_centre_per_pass(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The baseline: k-means++ with the squared distances updated after every centre."""
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    centres[0] = x[rng.integers(len(x))]
    sq_norm = np.einsum("nd,nd->n", x, x)
    nearest = np.maximum(sq_norm - 2.0 * (x @ centres[0]) + float(centres[0] @ centres[0]), 0.0)
    for j in range(1, k):
        cumulative = np.cumsum(nearest, dtype=np.float64)
        pick = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(x) - 1)
        centres[j] = x[pick]
        np.minimum(nearest, np.maximum(sq_norm - 2.0 * (x @ centres[j]) + float(centres[j] @ centres[j]), 0.0),
                   out=nearest)
    return centres


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    return float(assign(x, centres)[1].astype(np.float64).sum())


def measure(method, x: np.ndarray, k: int, seed: int) -> dict:
    t0 = time.perf_counter()
    centres = method(x, k, np.random.default_rng(seed))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "inertia_seeded": inertia(x, centres),
            "inertia_after_lloyd": inertia(x, _lloyd(x, centres, ITERATIONS, seed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 384])
    parser.add_argument("--repeats", type=int, default=2, help="seeds per shape; the fastest run counts for time")
    args = parser.parse_args()
    results = []
    for d in args.dims:
        for k in args.k:
            x = np.ascontiguousarray(mixture(POINTS_PER_CENTROID * k, d)[0])
            runs = {"rounds": [], "one_per_pass": []}
            for seed in range(args.repeats):  # the two take turns: a change of load hits both
                runs["one_per_pass"].append(measure(one_centre_per_pass, x, k, seed))
                runs["rounds"].append(measure(kmeans_plus_plus, x, k, seed))
            row = {"n": len(x), "d": d, "k": k}
            for name, done in runs.items():
                row[f"{name}_seconds"] = round(min(r["seconds"] for r in done), 3)
            row["speedup"] = round(row["one_per_pass_seconds"] / row["rounds_seconds"], 2)
            for key in ("inertia_seeded", "inertia_after_lloyd"):
                ratios = [a[key] / b[key] for a, b in zip(runs["rounds"], runs["one_per_pass"], strict=True)]
                row[f"{key}_ratio"] = round(float(np.mean(ratios)), 4)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"bench": "kmeans_seeding", "points_per_centroid": POINTS_PER_CENTROID,
                      "lloyd_iterations": ITERATIONS, "repeats": args.repeats, "results": results,
                      "min_speedup": min(r["speedup"] for r in results),
                      "max_inertia_after_lloyd_ratio": max(r["inertia_after_lloyd_ratio"] for r in results)},
                     indent=2))


if __name__ == "__main__":
    main()
