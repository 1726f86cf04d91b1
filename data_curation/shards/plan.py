"""Which selected image goes into which shard, in a seeded order that mixes clusters.

The plan is decided once, before any shard is written, so that a group of shards can be
written anywhere (one Ray task each) and rewritten alone later with the same content. It
is a pure function of the selected manifest rows, their source sizes, the seed and the
shard limits; the stage keeps it beside its inner checkpoints so that a rerun reuses it
even if some source images have vanished meanwhile.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_curation.embedding_store import LATER_COLUMNS, SPAN_COLUMNS, with_later_columns
from data_curation.sources import Span, split_tar_member_uri
from data_curation.storage import Storage

# Tar headers, JSON metadata and padding that each sample adds to its image bytes.
SAMPLE_OVERHEAD_BYTES = 2048
_CLUSTER_COLUMN = re.compile(r"^cluster_l(\d+)$")
_PLAN_COLUMNS = ("id", "uri", "sha256", "width", "height", "selected_by")


@dataclass(frozen=True)
class ShardLimits:
    """How big a shard may get: at most ``samples`` samples and about ``max_bytes`` bytes."""

    samples: int
    max_bytes: int
    seed: int


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


def cluster_columns(table: pa.Table) -> list[str]:
    """The manifest's cluster_l1..cluster_lN columns, finest level first."""
    found = [(int(m.group(1)), name) for name in table.column_names if (m := _CLUSTER_COLUMN.match(name))]
    return [name for _, name in sorted(found)]


def read_selected(manifest: bytes, source: str) -> tuple[pa.Table, int]:
    """The rows with ``selected == True`` of the manifest Parquet bytes ``manifest`` (read from
    ``source``, named in errors), sorted by id so that the plan ignores the manifest's row order,
    and the number of selected rows dropped for repeating an id (a sample key must be unique).

    The cluster columns are folded into one ``clusters`` list column (finest level first);
    ``span_start``, ``span_end`` and ``bytes`` are null for all rows of a manifest without them
    (older runs).
    """
    file = pq.ParquetFile(io.BytesIO(manifest))
    names = file.schema_arrow.names
    missing = [c for c in (*_PLAN_COLUMNS, "selected") if c not in names]
    if missing:
        raise ValueError(f"manifest {source} lacks the column(s) {', '.join(missing)}")
    # A row group at a time, only the columns the plan needs: the selection is a share of the pool.
    wanted = [c for c in names if c in (*_PLAN_COLUMNS, "selected", *LATER_COLUMNS) or _CLUSTER_COLUMN.match(c)]
    parts = [part.filter(pc.fill_null(part["selected"], False))
             for part in (file.read_row_group(i, columns=wanted) for i in range(file.num_row_groups))]
    table = with_later_columns(pa.concat_tables(parts) if parts else file.schema_arrow.empty_table().select(wanted))
    levels = cluster_columns(table)
    columns = [table[c].to_pylist() for c in levels]
    clusters = [list(row) for row in zip(*columns, strict=True)] if levels else [[]] * table.num_rows
    out = table.select(list(_PLAN_COLUMNS)).append_column("clusters", pa.array(clusters, pa.list_(pa.int64())))
    for column in LATER_COLUMNS:
        out = out.append_column(column, table[column])
    out = out.sort_by("id")
    ids = out["id"].to_pylist()
    first = [i == 0 or ids[i] != ids[i - 1] for i in range(len(ids))]
    return out.filter(pa.array(first, pa.bool_())), len(ids) - sum(first)


def plan_spans(table: pa.Table) -> list[Span | None]:
    """The tar spans of the rows of a table from :func:`read_selected` or :func:`load_plan`,
    None for none."""
    starts, ends = (table[column].to_pylist() for column in SPAN_COLUMNS)
    return [None if start is None else (start, end) for start, end in zip(starts, ends, strict=True)]


def _folder_sizes(folder: str, storage: Storage) -> tuple[Any, dict[str, int]]:
    """The folder's filesystem and the sizes of the files directly in it, by path."""
    fs, path = storage.fs(folder)
    try:
        return fs, {e["name"].rstrip("/"): e["size"] for e in fs.ls(path, detail=True) if e["type"] == "file"}
    except FileNotFoundError:
        return fs, {}


def _tar_member_sizes(tar_uri: str, storage: Storage) -> dict[str, int]:
    """The sizes of a tar's members, from its headers (an uncompressed tar is seeked, not read)."""
    try:
        with storage.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            return {m.name: m.size for m in tar.getmembers() if m.isfile()}
    except (FileNotFoundError, tarfile.TarError):
        return {}


def stat_sources(uris: list[str], storage: Storage | None = None) -> list[int | None]:
    """Each source's size in bytes, None for one that no longer exists; for the rows of a
    manifest that has no ``bytes`` for them (one of a run from before curate kept them).

    Sizes come from one listing per folder (one LIST request per 1,000 objects on S3) and
    one header scan per source tar, rather than one request per file.
    """
    storage = storage or Storage()
    folders: dict[str, tuple[Any, dict[str, int]]] = {}
    tars: dict[str, dict[str, int]] = {}
    sizes: list[int | None] = []
    for uri in uris:
        member = split_tar_member_uri(uri)
        if member is not None:
            tar_uri, name = member
            if tar_uri not in tars:
                tars[tar_uri] = _tar_member_sizes(tar_uri, storage)
            sizes.append(tars[tar_uri].get(name))
            continue
        folder = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else "."
        if folder not in folders:
            folders[folder] = _folder_sizes(folder, storage)
        fs, listing = folders[folder]
        sizes.append(listing.get(fs._strip_protocol(uri)))
    return sizes


def mixed_order(clusters: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation in which each cluster is spread evenly from start to end.

    Every member of a cluster of size n gets the key (rank + u) / n, rank being its place
    in a random order of its cluster and u uniform in [0, 1): sorting by the key gives each
    stretch of the order (so each shard) its proportional share of every cluster, which a
    plain shuffle only gives on average.
    """
    n = len(clusters)
    rng = np.random.default_rng(seed)
    by_cluster = np.lexsort((rng.random(n), clusters))
    sorted_clusters = clusters[by_cluster]
    starts = np.flatnonzero(np.r_[True, sorted_clusters[1:] != sorted_clusters[:-1]]) if n else np.array([], int)
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    keys = np.empty(n)
    keys[by_cluster] = (rank + rng.random(n)) / np.repeat(sizes, sizes)
    return np.argsort(keys, kind="stable")


def assign_shards(sizes: np.ndarray, limits: ShardLimits) -> np.ndarray:
    """Shard number of each sample taken in order: a new shard starts when either limit is hit.

    A sample larger than the byte limit on its own gets a shard to itself.
    """
    shard = np.empty(len(sizes), dtype=np.int64)
    number, count, used = 0, 0, 0
    for i, size in enumerate(int(s) + SAMPLE_OVERHEAD_BYTES for s in sizes):
        if count and (count >= limits.samples or used + size > limits.max_bytes):
            number, count, used = number + 1, 0, 0
        shard[i] = number
        count += 1
        used += size
    return shard


def make_plan(selected: pa.Table, sizes: list[int | None], limits: ShardLimits) -> pa.Table:
    """The plan: the selected rows whose source still exists (size not None), in shard order,
    with ``source_bytes`` and ``shard`` columns."""
    present = np.array([s is not None for s in sizes], dtype=bool)
    table = selected.filter(pa.array(present)).append_column(
        "source_bytes", pa.array([s for s in sizes if s is not None], pa.int64()))
    finest = [c[0] if len(c) and c[0] is not None else -1 for c in table["clusters"].to_pylist()]
    order = mixed_order(np.asarray(finest, dtype=np.int64), limits.seed)
    table = table.take(pa.array(order, pa.int64()))
    shard = assign_shards(table["source_bytes"].to_numpy(), limits)
    return table.append_column("shard", pa.array(shard, pa.int64()))


def plan_fingerprint(manifest_bytes: bytes, limits: ShardLimits) -> str:
    """What a stored plan must match to be reused: the manifest's bytes and the shard limits."""
    h = hashlib.sha256(manifest_bytes)
    h.update(json.dumps(limits.__dict__, sort_keys=True).encode())
    return h.hexdigest()


def save_plan(plan: pa.Table, uri: str, fingerprint: str, storage: Storage | None = None) -> None:
    storage = storage or Storage()
    plan = plan.replace_schema_metadata({b"vfm_plan_fingerprint": fingerprint.encode()})
    sink = io.BytesIO()
    pq.write_table(plan, sink)
    storage.write_bytes(uri, sink.getvalue())


def load_plan(uri: str, fingerprint: str, storage: Storage | None = None) -> pa.Table | None:
    """The plan stored at ``uri`` if it was made from the same manifest and limits, else None."""
    storage = storage or Storage()
    if not storage.exists(uri):
        return None
    plan = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    stored = (plan.schema.metadata or {}).get(b"vfm_plan_fingerprint", b"").decode()
    return with_later_columns(plan) if stored == fingerprint else None
