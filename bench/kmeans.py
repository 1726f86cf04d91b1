"""Hierarchical k-means (4 levels, resampling on) against one flat faiss.Kmeans, same data.

For each shape (N x D) and for 4N x D: the hierarchy (data_curation.hkmeans: fit on the
level-1 training sample, then assign every point) and the baseline (faiss.Kmeans with
the level-1 k and the same Lloyd iterations, trained the faiss way — it subsamples to
256 points per centroid — then assigning every point). Each run is its own subprocess,
so its peak RSS is its own. Data: a Zipf-weighted mixture of 1000 Gaussians. After its
clock stops, each run also scores its clusters: the entropy of the Gaussians in a 10% sample
with an equal pick per level-1 cluster (and, for the hierarchy, top-down over all levels),
/ log(1000), beside the raw data's: what resampling buys for the time it costs.

Targets: hierarchy / flat <= 1.5 at each size; hierarchy time at 4N / at N <= 4.5.

    python bench/kmeans.py            # quick: 100k x 64 and 20k x 384 (and 4x each), k1 = 250
    python bench/kmeans.py --full     # the issue's sizes: 1M x 64 and 200k x 384 (and 4x each), k1 = 1000
    python bench/kmeans.py --full --dim 384   # one of them
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FULL_LEVELS = "1000:2,200:10,50:10,10:10"  # k:resampling_steps per level, bottom first
QUICK_LEVELS = "250:2,50:10,20:10,5:10"
ITERATIONS = 10


def mixture(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 from 1000 Gaussians with Zipf(1.1) weights, generated in blocks, and
    each point's Gaussian (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32) * 4.0
    weights = 1.0 / np.arange(1, 1001) ** 1.1
    comp = rng.choice(1000, size=n, p=weights / weights.sum())
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        out[start:stop] = centres[comp[start:stop]] + rng.standard_normal((stop - start, d), dtype=np.float32)
    return out, comp


def run_one(method: str, n: int, d: int, spec: str) -> dict:
    import faiss

    from data_curation.hkmeans import KMeansParams, LevelSpec, assign, fit_hierarchy, training_rows
    from data_curation.manifest import normalized_entropy
    from data_curation.sampling import balanced_sample

    x, component = mixture(n, d)
    levels = tuple(LevelSpec(int(k), int(r)) for k, r in (p.split(":") for p in spec.split(",")))
    t0 = time.perf_counter()
    if method == "hierarchical":
        params = KMeansParams(levels=levels, iterations=ITERATIONS, seed=0)
        hierarchy = fit_hierarchy(x[training_rows(n, params)], params)
        labels, _ = assign(x, hierarchy.centroids[0])
        tree = hierarchy.levels_of(labels)
    else:
        km = faiss.Kmeans(d, levels[0].k, niter=ITERATIONS, seed=0, verbose=False)
        km.train(x)
        labels, _ = assign(x, km.centroids)
    seconds = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sizes = np.bincount(labels, minlength=levels[0].k)
    out = {"method": method, "n": n, "d": d, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb, 1),
           "level1_size_cv": round(float(sizes.std() / sizes.mean()), 3)}
    # What the clusters are worth (after the clock): entropy of the mixture's Gaussians in a 10%
    # sample with an equal pick per level-1 cluster, and, for the hierarchy, top-down over all
    # its levels; / log(1000). The raw data's entropy is the baseline.
    out["balance_raw"] = round(normalized_entropy(component, 1000), 3)
    out["balance_level1_equal_picks"] = round(normalized_entropy(
        component[balanced_sample(labels[:, None], n // 10, 0)], 1000), 3)
    if method == "hierarchical":
        out["balance_hierarchy_sample"] = round(normalized_entropy(
            component[balanced_sample(tree, n // 10, 0)], 1000), 3)
    return out


def measure_pair(n: int, d: int, spec: str, repeats: int) -> tuple[dict, dict]:
    """The fastest of ``repeats`` runs of each method, the two methods taking turns (the machine
    is shared: the minimum is the least disturbed run, and turns spread a change of load over both)."""
    runs: dict[str, list[dict]] = {"hierarchical": [], "flat": []}
    for _ in range(repeats):
        for method in runs:
            out = subprocess.run([sys.executable, __file__, "--one", method, str(n), str(d), spec], check=True,
                                 capture_output=True, text=True)
            runs[method].append(json.loads(out.stdout))
    best = {}
    for method, done in runs.items():
        best[method] = min(done, key=lambda r: r["seconds"])
        best[method]["all_seconds"] = [r["seconds"] for r in done]
    return best["hierarchical"], best["flat"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="1M x 64 and 200k x 384 (several minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the fastest counts")
    parser.add_argument("--dim", type=int, nargs="+", help="only the shapes of these dimensions (64, 384)")
    parser.add_argument("--one", nargs=4, metavar=("METHOD", "N", "D", "LEVELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.one[3])))
        return
    shapes = [(1_000_000, 64), (200_000, 384)] if args.full else [(100_000, 64), (20_000, 384)]
    if args.dim:
        shapes = [(n, d) for n, d in shapes if d in args.dim]
    levels = FULL_LEVELS if args.full else QUICK_LEVELS
    results = []
    for n, d in shapes:
        row: dict = {"shape": f"{n}x{d}"}
        for scale in (1, 4):
            hier, flat = measure_pair(scale * n, d, levels, args.repeats)
            row[f"x{scale}"] = {"hierarchical": hier, "flat_faiss_kmeans": flat,
                                "ratio_hierarchical_over_flat": round(hier["seconds"] / flat["seconds"], 3)}
        row["hierarchical_growth_at_4x_points"] = round(row["x4"]["hierarchical"]["seconds"]
                                                        / row["x1"]["hierarchical"]["seconds"], 3)
        results.append(row)
    ratios = [r[f"x{s}"]["ratio_hierarchical_over_flat"] for r in results for s in (1, 4)]
    growth = [r["hierarchical_growth_at_4x_points"] for r in results]
    print(json.dumps({"bench": "kmeans", "levels": levels, "iterations": ITERATIONS, "full": args.full,
                      "repeats": args.repeats,
                      "results": results, "max_ratio": max(ratios), "max_growth_4x": max(growth),
                      "targets": {"ratio": "<= 1.5", "growth_4x": "<= 4.5"},
                      "pass": max(ratios) <= 1.5 and max(growth) <= 4.5}, indent=2))


if __name__ == "__main__":
    main()
