"""The demo pool as the curate stage makes and reports it: where it is written, its copy
beside a remote run dir, and the hidden-class balance before and after curation."""
from __future__ import annotations

import os
import posixpath
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_curation.demo_pool import IMAGES_DIR, LABELS_FILE, DemoPoolSpec, make_demo_pool, read_labels
from data_curation.manifest import normalized_entropy
from data_curation.storage import Storage
from orchestration.stage import StageContext

DEMO_SOURCE = "demo:"


def demo_pool_dir(ctx: StageContext) -> Path:
    if ctx.section.demo_dir:
        return Path(ctx.section.demo_dir)
    if not Storage.is_remote(ctx.dir):
        return Path(ctx.dir) / "demo_pool"
    # Shared by the runs of this user, so one folder per spec: another seed or size makes another pool.
    spec = f"seed{int(ctx.config.run.seed)}-head{ctx.section.demo_head_count}"
    return Path.home() / ".cache" / "vfm" / f"demo_pool-{spec}"


def demo_images(ctx: StageContext) -> str:
    """The demo pool's images folder. It is written to local disk; under a remote run dir it
    is also copied into the curate folder, so that decode tasks on every node of a cluster
    read it (labels.parquet goes last and marks a complete copy)."""
    local = demo_pool_dir(ctx)
    try:
        spec = DemoPoolSpec(head_count=ctx.section.demo_head_count, seed=int(ctx.config.run.seed))
        images = make_demo_pool(local, spec)
    except ValueError as exc:
        raise ValueError(f"curate.demo_dir: {exc}") from None
    if not Storage.is_remote(ctx.dir):
        return str(images)
    remote = Storage.join(ctx.dir, "demo_pool")
    if not ctx.storage.exists(Storage.join(remote, LABELS_FILE)):
        ctx.log(f"copying the demo pool to {remote}")
        ctx.storage.put_tree(images, Storage.join(remote, IMAGES_DIR))
        ctx.storage.put_file(local / LABELS_FILE, Storage.join(remote, LABELS_FILE))
    return Storage.join(remote, IMAGES_DIR)


def class_plot(ctx: StageContext, demo_images: str, manifest_file: Path, metrics: dict[str, float]) -> Path:
    """Hidden-class balance of the demo pool, before (accepted) and after (selected). Images
    are matched on their file name within ``demo_images`` (local or a remote copy)."""
    labels = read_labels(demo_pool_dir(ctx)).to_pydict()
    class_of = {posixpath.basename(u): c for u, c in zip(labels["uri"], labels["class"], strict=True) if c}

    def folder(uri: str) -> str:
        return uri if Storage.is_remote(uri) else os.path.abspath(uri)

    home = folder(demo_images)
    manifest = pq.read_table(manifest_file, columns=["uri", "reject_reason", "selected"])
    names = [posixpath.basename(u) if posixpath.dirname(folder(u)) == home else None
             for u in manifest.column("uri").to_pylist()]
    accepted = [r is None for r in manifest.column("reject_reason").to_pylist()]
    selected = manifest.column("selected").to_pylist()
    before = [class_of[u] for u, a in zip(names, accepted, strict=True) if a and u in class_of]
    after = [class_of[u] for u, s in zip(names, selected, strict=True) if s and u in class_of]
    n_classes = len(set(class_of.values()))
    metrics["class_balance_before"] = normalized_entropy(np.asarray(before), n_classes)
    metrics["class_balance_after"] = normalized_entropy(np.asarray(after), n_classes)
    from data_curation.plots import plot_class_histogram

    return plot_class_histogram(before, after, ctx.cache_dir / "plots" / "class_histogram.png")
