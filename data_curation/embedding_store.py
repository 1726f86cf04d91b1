"""Embeddings in chunks: written one finished chunk at a time, memory-mapped when read.

Chunk ``i`` covers listing rows ``[i * chunk_size, (i + 1) * chunk_size)`` and is three
files under the store's folder (a URI, local or s3://):

- ``chunk-000007.embedding.npy``: (n_accepted, dim) float32, the accepted rows in order
- ``chunk-000007.copy.npy``: (n_accepted, copy_dim) float32, copy-detection descriptors
- ``chunk-000007.parquet``: one row per listed URI (rejected too), written LAST, so its
  presence means the chunk is complete and a resumed run skips it.

Reading maps the .npy files (copied to a local cache first when the store is on S3), so
only what a step touches is paged in.
"""
from __future__ import annotations

import io
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_curation.storage import Storage

_CHUNK_RE = re.compile(r"chunk-(\d{6,})\.parquet$")  # past 999999 the name grows


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


def chunk_indices(root: str, storage: Storage) -> set[int]:
    """Indices of the ``chunk-NNNNNN.parquet`` files in the folder ``root`` (embedding chunks
    here, listing chunks in the curate stage)."""
    found = set()
    for uri in storage.ls(root):
        match = _CHUNK_RE.search(uri)
        if match:
            found.add(int(match.group(1)))
    return found


def _strings(values) -> pa.Array:
    """A string column; "" (scan's "not applicable") becomes null."""
    return pa.array([str(v) or None for v in values], pa.string())


SPAN_COLUMNS = ("span_start", "span_end")  # a tar member's byte span in its tar (sources.Listed.span)
LATER_COLUMNS = (*SPAN_COLUMNS, "bytes")  # int64 columns that chunks, manifests and plans of older runs lack


def meta_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """The Parquet metadata of a chunk (uri, id, sha256, width, height, reject_reason,
    span_start, span_end, bytes); width/height null when unknown, the span null for no span,
    bytes (the image file's size) null when unreadable (-1 in ``rows``, or no such column)."""
    width = np.asarray(rows["width"], dtype=np.int32)
    height = np.asarray(rows["height"], dtype=np.int32)
    table = pa.table({
        "uri": _strings(rows["uri"]),
        "id": _strings(rows["id"]),
        "sha256": _strings(rows["sha256"]),
        "width": pa.array(width, pa.int32(), mask=width < 0),
        "height": pa.array(height, pa.int32(), mask=height < 0),
        "reject_reason": _strings(rows["reject_reason"]),
    })
    for column in LATER_COLUMNS:
        values = np.asarray(rows.get(column, np.full(table.num_rows, -1)), dtype=np.int64)
        table = table.append_column(column, pa.array(values, pa.int64(), mask=values < 0))
    return table


def with_later_columns(table: pa.Table) -> pa.Table:
    """``table`` with null :data:`LATER_COLUMNS` where it lacks them (a chunk, manifest or shard
    plan written before they were kept)."""
    for column in LATER_COLUMNS:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.int64()))
    return table


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


@dataclass
class Chunk:
    index: int
    meta: pa.Table  # one row per listed URI
    embedding: np.ndarray  # (n_accepted, dim), memory-mapped
    copy: np.ndarray  # (n_accepted, copy_dim), memory-mapped


class ChunkStore:
    """The chunk folder ``root`` (URI); ``cache_dir`` holds local copies of remote chunks."""

    def __init__(self, root: str, storage: Storage | None = None, cache_dir: str | Path | None = None):
        self.root = root
        self.storage = storage or Storage()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def done(self) -> set[int]:
        """Indices of complete chunks."""
        return chunk_indices(self.root, self.storage)

    def write(self, index: int, rows: dict[str, np.ndarray]) -> None:
        """Write one finished chunk from the columns of ``scan.embed_rows``."""
        accepted = np.asarray(rows["accepted"], dtype=bool)
        base = Storage.join(self.root, chunk_name(index))
        self.storage.write_bytes(f"{base}.embedding.npy", _npy_bytes(np.asarray(rows["embedding"])[accepted]))
        self.storage.write_bytes(f"{base}.copy.npy", _npy_bytes(np.asarray(rows["copy"])[accepted]))
        buf = io.BytesIO()
        pq.write_table(meta_table(rows), buf)
        self.storage.write_bytes(f"{base}.parquet", buf.getvalue())

    def clear(self) -> None:
        """Remove every chunk and its local copies."""
        self.storage.rm(self.root, recursive=True)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def _local(self, uri: str) -> str:
        if not Storage.is_remote(uri):
            return uri
        if self.cache_dir is None:
            raise ValueError(f"a local cache_dir is needed to memory-map {uri}")
        local = self.cache_dir / Path(uri).name
        if not local.exists():
            self.storage.get_file(uri, local)
        return str(local)

    def read_meta(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Chunk ``index``'s metadata: every column, or only ``columns`` (``()``: none, the row
        count alone); the :data:`LATER_COLUMNS` of older chunks are null (:func:`with_later_columns`)."""
        data = io.BytesIO(self.storage.read_bytes(Storage.join(self.root, f"{chunk_name(index)}.parquet")))
        if columns is None:
            return with_later_columns(pq.read_table(data))
        present = set(pq.ParquetFile(data).schema_arrow.names)
        table = pq.read_table(data, columns=[c for c in columns if c in present or c not in LATER_COLUMNS])
        return with_later_columns(table).select(list(columns))

    def vectors(self, index: int, kind: str) -> np.ndarray:
        """Chunk ``index``'s ``kind`` vectors ("embedding" or "copy"), memory-mapped."""
        return np.load(self._local(Storage.join(self.root, f"{chunk_name(index)}.{kind}.npy")), mmap_mode="r")

    def read(self, index: int, columns: Sequence[str] | None = None) -> Chunk:
        """Chunk ``index``: its metadata (``columns`` as for :meth:`read_meta`) and its mapped vectors."""
        return Chunk(index, self.read_meta(index, columns), self.vectors(index, "embedding"),
                     self.vectors(index, "copy"))
