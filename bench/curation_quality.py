"""Curation quality on the demo pool: class balance of the selection and duplicate detection.

Runs the curation library (decode, embedder, dedup, hierarchical k-means, balanced
sampling) in-process on the demo pool, with the curation settings of a config (``--config``,
by default ``local``: what the embedded default run uses, the built-in embedder; ``--set``
overrides one value as ``vfm run --set`` does, e.g. ``curate.embed.embedder=PATH`` for a
trained backbone), and scores it with the hidden labels:

- balance: entropy of the hidden-class distribution / log(#classes), for the raw pool
  (accepted images), the curated selection, and baselines of the same size measured in
  the same run: a uniform random sample, and the other top-down weighting ("leaves"
  when the config's curate.sample.weighting is "equal") on the same hierarchy. Target: selection
  >= 0.9, raw far below.
- duplicates: pairs of images in one duplicate group vs. pairs of the same planted
  family (an original and its exact/near copies). Target: recall >= 0.95, precision >= 0.99.

``with_true_class_feature`` repeats the clustering and sampling with each image's hidden
class joined to its embedding: a diagnostic (curation never sees the classes) that bounds
what a better embedder could reach with the same hierarchy and target.

``balance_curated`` is one k-means draw per pool (seeded by the pool seed). The clustering
and sampling are also re-run under ``--kmeans-repeats`` other seeds on the same pool
(cheap beside the scan): one draw swings by several hundredths, so the spread over draws
says how much of a difference between two settings is noise.

    python bench/curation_quality.py [--config local] [--seeds 0 1 2 3] [--kmeans-repeats 5]
        [--set curate.sample.target=0.2] [--set 'curate.cluster.levels=[{k: 64}, {k: 16}]']
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_curation.dedup import deduplicate  # noqa: E402
from data_curation.demo_pool import DemoPoolSpec, make_demo_pool, read_labels  # noqa: E402
from data_curation.embedders import build_embedder  # noqa: E402
from data_curation.hkmeans import KMeansParams, assign, fit_hierarchy  # noqa: E402
from data_curation.manifest import normalized_entropy  # noqa: E402
from data_curation.sampling import balanced_sample, resolve_target  # noqa: E402
from data_curation.scan import scan_uris  # noqa: E402
from data_curation.sources import iter_source  # noqa: E402
from pipeline.config.root import load_config  # noqa: E402
from pipeline.stages.curate import decode_limits, kmeans_params  # noqa: E402


def pair_scores(groups: np.ndarray, families: np.ndarray) -> tuple[float, float]:
    """(recall, precision) of same-group pairs against same-family pairs."""
    def pairs(labels: np.ndarray) -> set[tuple[int, int]]:
        out = set()
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for members in np.split(order, bounds):
            members = np.sort(members)
            out.update((int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1:])
        return out

    predicted, truth = pairs(groups), pairs(families)
    hit = len(predicted & truth)
    return hit / max(len(truth), 1), hit / max(len(predicted), 1)


def fit_tree(emb: np.ndarray, params: KMeansParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The curate stage's hierarchy under ``seed``: (N, levels) cluster ids and each row's
    squared distance to its level-1 centroid."""
    hierarchy = fit_hierarchy(emb, dataclasses.replace(params, seed=seed))
    level1, distance = assign(emb, hierarchy.centroids[0])
    return hierarchy.levels_of(level1), distance


def draw(tree: np.ndarray, distance: np.ndarray, sample, count: int, seed: int,
         weighting: str | None = None) -> np.ndarray:
    """Rows of one balanced sample of ``tree`` as the curate stage draws it."""
    return balanced_sample(tree, count, seed, leaf_pick=sample.leaf_pick, distance=distance,
                           weighting=weighting or sample.weighting)


def redrawn_balance(emb: np.ndarray, params: KMeansParams, sample, count: int, seed: int,
                    classes: np.ndarray, n_classes: int) -> float:
    """Class balance of a sample from a hierarchy fitted anew, both under ``seed``."""
    return normalized_entropy(classes[draw(*fit_tree(emb, params, seed), sample, count, seed)], n_classes)


def run_once(seed: int, curate, kmeans_repeats: int, work: Path) -> dict:
    pool = make_demo_pool(work / f"pool-{seed}", DemoPoolSpec(seed=seed))
    labels = read_labels(work / f"pool-{seed}").to_pydict()
    info = {u: (c, f) for u, c, f in zip(labels["uri"], labels["class"], labels["family"], strict=True)}
    uris = list(iter_source(str(pool)))
    t0 = time.perf_counter()
    rows = scan_uris(uris, build_embedder(curate.embed.embedder, curate.embed.image_size),
                     decode_limits(curate.decode))
    scan_s = time.perf_counter() - t0
    acc = np.flatnonzero(rows["accepted"])
    classes = np.array([info[rows["uri"][i]][0] for i in acc], dtype=object)
    families = np.array([info[rows["uri"][i]][1] for i in acc], dtype=np.int64)
    n_classes = len(set(classes))

    dedup = deduplicate(rows["sha256"][acc], rows["copy"][acc], threshold=curate.dedup.threshold, k=curate.dedup.k)
    recall, precision = pair_scores(dedup.group, families)
    kept = np.flatnonzero(dedup.kept)
    emb = rows["embedding"][acc][kept]
    params = kmeans_params(curate.cluster, seed)
    count = resolve_target(curate.sample.target, len(kept))
    tree, distance = fit_tree(emb, params, seed)
    curated = draw(tree, distance, curate.sample, count, seed)
    other_weighting = "leaves" if curate.sample.weighting == "equal" else "equal"
    other = draw(tree, distance, curate.sample, count, seed, other_weighting)
    rng = np.random.default_rng(seed)
    random_pick = rng.choice(len(kept), size=count, replace=False)
    kept_classes = classes[kept]
    # Other k-means/sampling seeds on the same pool: 1000 apart, never another pool's seed.
    draws = [normalized_entropy(kept_classes[curated], n_classes)] + [
        redrawn_balance(emb, params, curate.sample, count, seed + 1000 * r, kept_classes, n_classes)
        for r in range(1, kmeans_repeats + 1)]
    # A diagnostic, not curation: the same clustering and sampling with each image's hidden class
    # joined to its embedding (a one-hot far larger than the embedding's spread). What this
    # reaches is the most a better embedder could give with this hierarchy and target.
    names = sorted(set(kept_classes))
    one_hot = np.eye(len(names), dtype=np.float32)[[names.index(c) for c in kept_classes]]
    with_class = np.concatenate([emb, 3.0 * one_hot], axis=1)
    bound = [redrawn_balance(with_class, params, curate.sample, count, seed + 1000 * r, kept_classes, n_classes)
             for r in range(kmeans_repeats + 1)]
    return {
        "seed": seed,
        "pool_images": len(uris),
        "accepted": int(len(acc)),
        "classes": n_classes,
        "selected": int(count),
        "scan_seconds": round(scan_s, 2),
        "balance_raw_pool": normalized_entropy(classes, n_classes),
        "balance_after_dedup": normalized_entropy(kept_classes, n_classes),
        "balance_curated": normalized_entropy(kept_classes[curated], n_classes),
        "balance_curated_kmeans_draws": {"n": len(draws), "mean": float(np.mean(draws)),
                                         "min": float(np.min(draws)), "max": float(np.max(draws))},
        "with_true_class_feature_draws": {"n": len(bound), "mean": float(np.mean(bound)),
                                          "min": float(np.min(bound)), "max": float(np.max(bound))},
        "baseline_random_sample": normalized_entropy(kept_classes[random_pick], n_classes),
        "baseline_other_weighting": normalized_entropy(kept_classes[other], n_classes),
        "curated_class_counts": dict(sorted(Counter(kept_classes[curated]).items())),
        "dup_planted_pairs_recall": recall,
        "dup_planted_pairs_precision": precision,
        "dup_removed": int((~dedup.kept).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--config", default="local", help="preset name or YAML file whose curate.* settings are "
                        "measured (default: local, the embedded default run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, as vfm run --set does")
    parser.add_argument("--kmeans-repeats", type=int, default=5,
                        help="extra k-means/sampling seeds per pool for the spread of balance_curated")
    args = parser.parse_args()
    curate = load_config(args.config, args.overrides).curate
    with tempfile.TemporaryDirectory(prefix="vfm-quality-") as tmp:
        runs = [run_once(seed, curate, args.kmeans_repeats, Path(tmp))
                for seed in args.seeds]
    keys = ["balance_raw_pool", "balance_after_dedup", "balance_curated", "baseline_random_sample",
            "baseline_other_weighting", "dup_planted_pairs_recall", "dup_planted_pairs_precision"]
    summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    summary["min_balance_curated"] = float(min(r["balance_curated"] for r in runs))
    summary["balance_curated_mean_over_kmeans_draws"] = float(np.mean(
        [r["balance_curated_kmeans_draws"]["mean"] for r in runs]))
    summary["min_balance_curated_over_kmeans_draws"] = float(min(
        r["balance_curated_kmeans_draws"]["min"] for r in runs))
    summary["with_true_class_feature_mean_over_draws"] = float(np.mean(
        [r["with_true_class_feature_draws"]["mean"] for r in runs]))
    summary["with_true_class_feature_min_over_draws"] = float(min(
        r["with_true_class_feature_draws"]["min"] for r in runs))
    summary["min_dup_recall"] = float(min(r["dup_planted_pairs_recall"] for r in runs))
    summary["min_dup_precision"] = float(min(r["dup_planted_pairs_precision"] for r in runs))
    summary["targets"] = {"balance_curated": ">= 0.9", "dup_recall": ">= 0.95", "dup_precision": ">= 0.99"}
    summary["pass"] = bool(summary["min_balance_curated"] >= 0.9 and summary["min_dup_recall"] >= 0.95
                           and summary["min_dup_precision"] >= 0.99)
    summary["pass_every_kmeans_draw"] = bool(summary["pass"]
                                             and summary["min_balance_curated_over_kmeans_draws"] >= 0.9)
    levels = ",".join(f"{level.k}:{level.resampling_steps}" for level in curate.cluster.levels)
    print(json.dumps({"bench": "curation_quality", "config": args.config, "overrides": args.overrides,
                      "embedder": curate.embed.embedder,
                      "levels": levels, "target": curate.sample.target, "weighting": curate.sample.weighting,
                      "kmeans_repeats": args.kmeans_repeats,
                      "summary": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
