"""Embeddings in chunks: written one finished chunk at a time, memory-mapped when read.

Chunk ``i`` covers listing rows ``[i * chunk_size, (i + 1) * chunk_size)`` and is three
files under the store's folder (a URI, local or s3://):

- ``chunk-000007.embedding.npy``: (n_accepted, dim) float32, the accepted rows in order
- ``chunk-000007.copy.npy``: (n_accepted, copy_dim) float32, copy-detection descriptors
- ``chunk-000007.parquet``: one row per listed URI (rejected too), written LAST, so its
  presence means the chunk is complete and a resumed run skips it.

Reading maps the .npy files (copied to a local cache first when the store is on S3), so
only what a step touches is paged in. A chunk whose Parquet file is there but whose files
cannot be read as one chunk (damaged on disk, cut short, a vector file gone, a row count
other than its accepted images') raises :class:`DamagedChunks`; :meth:`ChunkStore.remove`
takes it away, so that the stage embeds it again.

Each write of a chunk gets a new generation, kept in the Parquet file's metadata; a local
copy is named by the generation it was made from, so a node whose cache outlived the chunk
(the stage re-embedded under new settings, while only the driver's cache was cleared) never
maps the old vectors.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_curation.storage import Storage

_CHUNK_RE = re.compile(r"chunk-(\d{6,})\.parquet$")  # past 999999 the name grows
_GENERATION_KEY = b"vfm.generation"  # a chunk's Parquet metadata: which write of the chunk it is
READ_AHEAD = 16  # chunks read at once from a remote store (s3fs sends at most 10 requests at once: its pool)


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


def _without_metadata(table: pa.Table) -> pa.Table:
    """``table`` without the file's metadata (the generation), which the manifest does not carry.
    A table of no columns is left as it is: pyarrow would lose its row count."""
    return table.replace_schema_metadata(None) if table.num_columns else table


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    return buf.getvalue()


def _max_open_maps() -> int:
    """A quarter of the process's file descriptors (each open map holds one), from 64 to 4,096."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(64, min(4096, (soft if soft != -1 else 1 << 20) // 4))


MAX_OPEN_MAPS = _max_open_maps()  # memory maps of chunk files a process keeps open
_open_maps: OrderedDict[tuple, np.ndarray] = OrderedDict()  # (path, inode, mtime, size) -> map, oldest first
_open_maps_lock = threading.Lock()


def _mapped(path: str) -> np.ndarray:
    """``path`` memory-mapped, from the most recently used :data:`MAX_OPEN_MAPS` maps when one of
    them is of this very file (a file written again under the same path is mapped anew)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns, st.st_size)
    with _open_maps_lock:
        mapped = _open_maps.get(key)
        if mapped is not None:
            _open_maps.move_to_end(key)
            return mapped
    mapped = np.load(path, mmap_mode="r")
    with _open_maps_lock:
        _open_maps[key] = mapped
        while len(_open_maps) > MAX_OPEN_MAPS:  # a view still in use keeps its own map alive
            _open_maps.popitem(last=False)
    return mapped


class MappedVectors:
    """The (rows, dim) vectors of a local .npy file, memory-mapped when read, through a cache of
    the :data:`MAX_OPEN_MAPS` most recently used maps. Every open map holds a file descriptor (a
    process has 1,024 to 65,536) and counts against the kernel's map limit (65,530): a pool of
    tens of thousands of chunks cannot keep two maps open per chunk from listing to manifest,
    and mapping a file anew for every slice read would cost ~65 us a slice."""

    def __init__(self, path: str):
        self.path = path
        mapped = self._map()
        self.shape, self.dtype = mapped.shape, mapped.dtype

    def _map(self) -> np.ndarray:
        return _mapped(self.path)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key) -> np.ndarray:
        """A view of the mapped file, which stays mapped until the view is dropped."""
        return self._map()[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self._map(), dtype=dtype)


class DamagedChunks(ValueError):
    """Chunks of the folder ``root`` that look complete but cannot be read: ``damaged`` maps
    each one's index to the reason. The message names the first, with how many more."""

    def __init__(self, root: str, damaged: dict[int, str]):
        self.root, self.damaged = root, dict(sorted(damaged.items()))
        (first, reason), more = next(iter(self.damaged.items())), len(self.damaged) - 1
        super().__init__(f"{Storage.join(root, chunk_name(first))} is damaged: {reason}"
                         + (f" (and {more} more chunk{'s' * (more > 1)})" if more else ""))

    def __reduce__(self):
        return type(self), (self.root, self.damaged)


# What reading a damaged chunk raises: pyarrow's on a file that is not Parquet (ArrowInvalid, a
# ValueError), numpy's on a cut header or a file shorter than its header says, a file that is
# gone, and pyarrow's OSError on a damaged page or footer of bytes already read (see
# parsing_damage), a page whose CRC does not match included: chunk and listing Parquet is written
# with page checksums and read verifying them, so a flipped bit in a value is found, not read as
# another value (chunks written before have none and are read as they are). Not among them:
# StorageError (the store failing), out-of-memory and the like.
DAMAGE = (ValueError, EOFError, FileNotFoundError)


@contextlib.contextmanager
def parsing_damage() -> Iterator[None]:
    """Around parsing Parquet bytes already in memory: pyarrow raises OSError, not ValueError, on
    some damaged pages and footers ("Unexpected end of stream", "Couldn't deserialize thrift");
    with no I/O left, that is damage, raised as a ValueError with the same message."""
    try:
        yield
    except OSError as exc:
        raise ValueError(str(exc).strip() or type(exc).__name__) from exc


def parquet_bytes(table: pa.Table, metadata: dict) -> bytes:
    """``table``, its schema metadata replaced by ``metadata``, as Parquet bytes with a checksum
    on every page (read back by :func:`read_parquet`)."""
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buf, write_page_checksum=True)
    return buf.getvalue()


def read_parquet(source, columns: Sequence[str] | None = None) -> pa.Table:
    """``pq.read_table`` verifying the page checksums (a page that has none is read as it is)."""
    return pq.read_table(source, columns=columns, page_checksum_verification=True)


@dataclass
class Chunk:
    index: int
    meta: pa.Table  # one row per listed URI
    embedding: MappedVectors  # (n_accepted, dim)
    copy: MappedVectors  # (n_accepted, copy_dim)
    generation: str | None = None  # which write of the chunk (None: written before they were kept)


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
        self.storage.write_bytes(f"{base}.parquet",
                                 parquet_bytes(meta_table(rows), {_GENERATION_KEY: uuid.uuid4().hex.encode()}))

    def clear(self) -> None:
        """Remove every chunk and its local copies."""
        self.storage.rm(self.root, recursive=True)
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def remove(self, indices: Iterable[int]) -> None:
        """Remove the chunks ``indices`` and their local copies; each one's Parquet file goes
        first, so from then on it is not done."""
        for index in indices:
            base = Storage.join(self.root, chunk_name(index))
            for suffix in (".parquet", ".embedding.npy", ".copy.npy"):
                self.storage.rm(base + suffix)
            self._drop_local_copies(index)

    def _local(self, uri: str, generation: str | None) -> str:
        """A local path of ``uri``: itself on a local store, else a copy in ``cache_dir``, in a
        folder of its own, named by the chunk's ``generation`` (asked of the store when not given:
        a chunk written before generations were kept is named by its object's version). Copies of
        other writes are removed when a new one is fetched."""
        if not Storage.is_remote(uri):
            return uri
        if self.cache_dir is None:
            raise TypeError(f"a local cache_dir is needed to memory-map {uri}")  # not a damaged chunk
        name = Path(uri)
        folder = self.cache_dir / name.stem  # chunk-000007.embedding/
        local = folder / f"{generation or self.storage.version(uri)}{name.suffix}"
        if not local.exists():
            (self.cache_dir / name.name).unlink(missing_ok=True)  # a copy kept before generations were
            for old in folder.iterdir() if folder.is_dir() else ():
                if old != local and not old.name.startswith("."):  # (a dot: another process's download)
                    old.unlink(missing_ok=True)  # a process that maps it keeps its pages
            self.storage.get_file(uri, local)
        return str(local)

    def _meta(self, index: int, columns: Sequence[str] | None,
              count_accepted: bool = False) -> tuple[pa.Table, str | None, int | None]:
        """Chunk ``index``'s metadata (see :meth:`read_meta`), its generation and, with
        ``count_accepted``, its accepted images (None without)."""
        data = io.BytesIO(self.storage.read_bytes(Storage.join(self.root, f"{chunk_name(index)}.parquet")))
        with parsing_damage():
            return self._parse_meta(data, columns, count_accepted)

    @staticmethod
    def _parse_meta(data: io.BytesIO, columns: Sequence[str] | None,
                    count_accepted: bool) -> tuple[pa.Table, str | None, int | None]:
        schema = pq.ParquetFile(data).schema_arrow
        generation = (schema.metadata or {}).get(_GENERATION_KEY)
        generation = generation.decode() if generation else None
        if columns is None:
            table = with_later_columns(_without_metadata(read_parquet(data)))
        else:
            table = read_parquet(data, [c for c in columns if c in schema.names or c not in LATER_COLUMNS])
            table = with_later_columns(_without_metadata(table)).select(list(columns))
        accepted = None
        if count_accepted:  # from the columns read when they hold the reasons, else from that column alone
            reasons = (table["reject_reason"] if "reject_reason" in table.column_names
                       else read_parquet(data, ["reject_reason"]).column(0))
            accepted = reasons.null_count
        return table, generation, accepted

    def read_meta(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Chunk ``index``'s metadata: every column, or only ``columns`` (``()``: none, the row
        count alone); the :data:`LATER_COLUMNS` of older chunks are null (:func:`with_later_columns`)."""
        return self._meta(index, columns)[0]

    def _vector_file(self, index: int, kind: str, generation: str | None) -> str:
        return self._local(Storage.join(self.root, f"{chunk_name(index)}.{kind}.npy"), generation)

    def vectors(self, index: int, kind: str, generation: str | None = None) -> np.ndarray:
        """Chunk ``index``'s ``kind`` vectors ("embedding" or "copy"), memory-mapped; ``generation``:
        the chunk's (:attr:`Chunk.generation`), which saves asking a remote store for it."""
        return _mapped(self._vector_file(index, kind, generation))

    def read_each(self, indices: Iterable[int], columns: Sequence[str] | None = None,
                  damage_at_end: bool = False) -> Iterator[Chunk]:
        """:meth:`read` of each of ``indices``, in order (see :meth:`_ahead`). With
        ``damage_at_end``, a damaged chunk is skipped, and once the others are read one
        :class:`DamagedChunks` names them all, rather than the first failing in its turn."""
        def read(index: int) -> Chunk | DamagedChunks:
            try:
                return self.read(index, columns)
            except DamagedChunks as exc:
                if not damage_at_end:
                    raise
                return exc

        damaged: dict[int, str] = {}
        for chunk in self._ahead(read, indices):
            if isinstance(chunk, DamagedChunks):
                damaged.update(chunk.damaged)
            else:
                yield chunk
        if damaged:
            raise DamagedChunks(self.root, damaged)

    def read_meta_each(self, indices: Iterable[int], columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """:meth:`read_meta` of each of ``indices``, in order (see :meth:`_ahead`)."""
        return self._ahead(lambda index: self.read_meta(index, columns), indices)

    def _ahead(self, read: Callable[[int], object], indices: Iterable[int]) -> Iterator:
        """``read(index)`` for each index, in order. From a remote store up to :data:`READ_AHEAD`
        chunks are read at once: each read is one to three requests (four for a chunk written
        before generations were kept), and one chunk after another their round trips add up to
        minutes over thousands of chunks. A read that fails raises in its turn."""
        indices = list(indices)
        if not Storage.is_remote(self.root) or len(indices) < 2:
            yield from map(read, indices)
            return
        with ThreadPoolExecutor(min(READ_AHEAD, len(indices)), thread_name_prefix="chunk-read") as pool:
            pending = deque()
            for index in indices:
                pending.append(pool.submit(read, index))
                if len(pending) == READ_AHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def read(self, index: int, columns: Sequence[str] | None = None) -> Chunk:
        """Chunk ``index``: its metadata (``columns`` as for :meth:`read_meta`), its vectors (mapped
        when read, see :class:`MappedVectors`) and its generation. Raises :class:`DamagedChunks`
        when its files cannot be read, or hold other than a vector per accepted image; from a
        remote store, only once its vector files, fetched again, are still damaged (the local
        copies may be what was damaged)."""
        try:
            return self._read(index, columns)
        except DamagedChunks:
            if not self._drop_local_copies(index):
                raise
        return self._read(index, columns)

    def _drop_local_copies(self, index: int) -> bool:
        """Remove the local copies of chunk ``index``'s vector files; whether there were any."""
        if self.cache_dir is None or not Storage.is_remote(self.root):
            return False
        found = [folder for kind in ("embedding", "copy")
                 if (folder := self.cache_dir / f"{chunk_name(index)}.{kind}").is_dir()]
        for folder in found:
            shutil.rmtree(folder, ignore_errors=True)
        return bool(found)

    def _read(self, index: int, columns: Sequence[str] | None) -> Chunk:
        try:
            meta, generation, accepted = self._meta(index, columns, count_accepted=True)
            chunk = Chunk(index, meta, MappedVectors(self._vector_file(index, "embedding", generation)),
                          MappedVectors(self._vector_file(index, "copy", generation)), generation)
        except DAMAGE as exc:
            raise DamagedChunks(self.root, {index: f"{type(exc).__name__}: {exc}"}) from exc
        for kind, vectors in (("embedding", chunk.embedding), ("copy", chunk.copy)):
            if len(vectors) != accepted or len(vectors.shape) != 2:
                raise DamagedChunks(self.root, {index: f"its {kind} vectors have shape {vectors.shape}, "
                                                       f"for {accepted} accepted images"})
        return chunk
