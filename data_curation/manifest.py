"""The curation manifest (curate/manifest.parquet) and the balance figure.

One row per listed image, rejected ones included. Columns (the schema the shard stage
reads): id, uri, span_start, span_end, sha256, bytes, width, height, reject_reason,
dup_group, dup_kept, dup_kind, cluster_l1..cluster_lN, selected, selected_by. The span is a
tar member's byte span in its tar (null for other images), which the shard stage reads
alone; bytes is the image file's size (null when unreadable), which it plans shards by. Per-row arrays come in aligned with the
listing; "not applicable" is null (dup columns for rejected rows, cluster ids for rows not
clustered, selected_by for rows not selected). ``dup_kind`` is null for a kept row and
"exact" / "near" for a removed one (same bytes as its group's kept row, or not).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def _masked_int64(values: np.ndarray) -> pa.Array:
    values = np.asarray(values, dtype=np.int64)
    return pa.array(values, pa.int64(), mask=values < 0)


def build_manifest(meta: pa.Table, dup_group: np.ndarray, dup_kept: np.ndarray, dup_kind: np.ndarray,
                   clusters: np.ndarray, selected_by: np.ndarray) -> pa.Table:
    """``meta`` holds id, uri, span_start, span_end, sha256, bytes, width, height, reject_reason
    for all N rows; the rest
    are (N,) arrays (``clusters`` (N, L)) with -1 / None where not applicable."""
    accepted = pc.is_null(meta.column("reject_reason")).to_numpy(zero_copy_only=False)
    kept = pa.array(np.asarray(dup_kept, dtype=bool), pa.bool_(), mask=~accepted)
    selected = np.array([s is not None for s in selected_by], dtype=bool)
    columns = {
        "id": meta.column("id"),
        "uri": meta.column("uri"),
        "span_start": meta.column("span_start"),
        "span_end": meta.column("span_end"),
        "sha256": meta.column("sha256"),
        "bytes": meta.column("bytes"),
        "width": meta.column("width"),
        "height": meta.column("height"),
        "reject_reason": meta.column("reject_reason"),
        "dup_group": _masked_int64(dup_group),
        "dup_kept": kept,
        "dup_kind": pa.array(list(dup_kind), pa.string()),
    }
    for level in range(clusters.shape[1]):
        columns[f"cluster_l{level + 1}"] = _masked_int64(clusters[:, level])
    columns["selected"] = pa.array(selected, pa.bool_())
    columns["selected_by"] = pa.array(list(selected_by), pa.string())
    return pa.table(columns)


def normalized_entropy(labels: np.ndarray, n_classes: int | None = None) -> float:
    """Entropy of the label distribution divided by log(#classes) (1 = perfectly balanced).

    ``n_classes`` defaults to the number of distinct labels seen. No labels at all: 0.0 (an
    empty selection is not a balanced one); a single possible class: 1.0.
    """
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    k = n_classes if n_classes is not None else len(counts)
    if counts.sum() == 0:
        return 0.0
    if k <= 1:
        return 1.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(k)) + 0.0  # + 0.0: one label gives 0.0, not -0.0
