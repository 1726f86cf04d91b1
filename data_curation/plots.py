"""Curation plots (PNG): cluster sizes and hidden-class counts, before and after sampling."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_cluster_sizes(pool_level1: np.ndarray, selected_level1: np.ndarray, path: str | Path) -> Path:
    """Level-1 cluster sizes, largest first, in the deduplicated pool and in the selection (log y)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for labels, name in ((pool_level1, "pool (after dedup)"), (selected_level1, "selected")):
        sizes = np.sort(np.bincount(np.asarray(labels, dtype=np.int64)))[::-1]
        sizes = sizes[sizes > 0]
        ax.plot(np.arange(1, len(sizes) + 1), sizes, marker=".", label=f"{name}: {int(sizes.sum())} images")
    ax.set_yscale("log")
    ax.set_xlabel("level-1 cluster rank")
    ax.set_ylabel("images in cluster")
    ax.set_title("Cluster sizes before and after balanced sampling")
    ax.legend()
    return _save(fig, path)


def plot_class_histogram(pool_classes: list[str], selected_classes: list[str], path: str | Path) -> Path:
    """Share of each hidden class in the raw pool and in the selection (demo pool only)."""
    names = sorted(set(pool_classes), key=lambda c: -pool_classes.count(c))
    pool = np.array([pool_classes.count(c) for c in names], dtype=np.float64)
    sel = np.array([selected_classes.count(c) for c in names], dtype=np.float64)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    ax.bar(x - 0.2, pool / max(pool.sum(), 1), width=0.4, label=f"raw pool ({int(pool.sum())})")
    ax.bar(x + 0.2, sel / max(sel.sum(), 1), width=0.4, label=f"selected ({int(sel.sum())})")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("share of images")
    ax.set_title("Hidden classes before and after curation")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made) and free it."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
