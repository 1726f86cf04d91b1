"""A listing: image sources streamed into chunks of URIs, the unit that curation embeds.

A listing is a folder of Parquet chunks (chunk, row, uri, and span_start and span_end, a tar
member's byte span in its tar, -1 for none) and ``_DONE.json`` once complete (rows per chunk,
the URI listed last and what listing skipped). Each chunk carries in its Parquet metadata
where the listing stood after its last row, so that

- a listing stopped part way picks up after its last whole chunk (:meth:`Listing.write`);
- a chunk found damaged later (a disk fault, a file cut short or removed by hand) is listed
  again from the chunk before it, while the sources still list the same way around it
  (:meth:`Listing.mend`): the embeddings of the other chunks stay valid.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_curation.embedding_store import (
    DAMAGE,
    chunk_indices,
    chunk_name,
    parquet_bytes,
    parsing_damage,
    read_parquet,
)
from data_curation.progress import Progress
from data_curation.sources import Listed, ListingCursor, ListingProblems, SourceError, iter_listed
from data_curation.storage import Storage

_DONE = "_DONE.json"
_WHERE = "vfm.listing"  # Parquet metadata key of a chunk: where the listing stood after it
_FORMAT = 2  # 2: with tar spans; a listing stopped part way in another format is listed anew


class DamagedListing(ValueError):
    """A listing chunk that cannot be read, holds another number of rows than were listed, or
    holds the rows of another chunk."""

    def __init__(self, uri: str, index: int, reason: str):
        self.uri, self.index, self.reason = uri, index, reason
        super().__init__(f"listing chunk {uri} is damaged: {reason}")

    def __reduce__(self):
        return type(self), (self.uri, self.index, self.reason)


def read_chunk(uri: str, index: int, rows: int, storage: Storage) -> pa.Table:
    """Listing chunk ``index`` at ``uri``, which was listed with ``rows`` rows; raises
    :class:`DamagedListing` when it cannot be read or holds another number of rows."""
    try:
        data = storage.read_bytes(uri)
        with parsing_damage():
            table = read_parquet(io.BytesIO(data))
    except DAMAGE as exc:
        raise DamagedListing(uri, index, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}") from None
    if table.num_rows != rows:
        raise DamagedListing(uri, index, f"{table.num_rows} rows, not the {rows} listed")
    if "chunk" not in table.column_names or not pc.all(pc.equal(table["chunk"], index)).as_py():
        raise DamagedListing(uri, index, f"its rows are not those of chunk {index}")
    return table


def log_problems(log: Callable[[str], None], problems: ListingProblems, prefix: str = "", shown: int = 20) -> None:
    """A line for each of the first ``shown`` things listing skipped, and one for the rest."""
    lines = problems.lines()
    for line in lines[:shown]:
        log(f"{prefix}skipped: {line}")
    if len(lines) > shown:
        log(f"{prefix}skipped: ... and {len(lines) - shown} more (curate/stats.json lists them all)")


@dataclass(frozen=True)
class Listing:
    """The listing of ``sources`` under the folder ``root``, ``chunk_size`` images a chunk."""

    sources: list[str]
    root: str
    storage: Storage
    chunk_size: int
    sniff: bool = True
    uri_column: str = "uri"

    def chunk(self, index: int) -> str:
        return Storage.join(self.root, f"{chunk_name(index)}.parquet")

    def write(self, log: Callable[[str], None] = lambda line: None,
              log_every_s: float | None = None) -> tuple[dict[int, int], ListingProblems]:
        """List the sources into chunks, or reuse a finished listing that found images, or pick
        up after the last whole chunk of an unfinished one. Returns rows per chunk and what
        listing skipped. ``log`` gets a progress line at most every ``log_every_s`` seconds
        (default :data:`~data_curation.progress.PROGRESS_EVERY_S`) while listing."""
        done_uri = Storage.join(self.root, _DONE)
        try:
            done = self._done() if self.storage.exists(done_uri) else {}
        except ValueError as exc:  # damaged: the listing goes on after its last whole chunk, as if it had none
            log(f"warning: {done_uri} is damaged ({type(exc).__name__}): reading the listing's chunks instead")
            done = {}
        if done.get("rows"):
            return {int(k): int(v) for k, v in done["rows"].items()}, ListingProblems.from_json(done)
        rows, cursor = self._listed_so_far()
        if rows:
            log(f"listing: picking up after {sum(rows.values())} images in {len(rows)} chunks")
        problems = cursor.problems.copy()
        batch: list[Listed] = []
        progress = Progress(log, "listing", None, "images", every_s=log_every_s, start_at=sum(rows.values()))

        def flush() -> None:
            rows[len(rows)] = len(batch)
            self._write_chunk(len(rows) - 1, batch, cursor, rows)
            batch.clear()
            if progress.due():
                images = sum(rows.values())
                log(f"listing: {images} images in {len(rows)} chunks so far, {progress.rate(images):.0f} images/s")

        last = None  # the URI listed last: mend tells by it sources that grew after the listing from others
        for item in self._items(problems, cursor):
            batch.append(item)
            last = item.uri
            if len(batch) == self.chunk_size:
                flush()
        if batch:
            flush()
        if rows:  # an empty listing is not kept: the next attempt lists the sources again, once they are fixed
            self.storage.write_json(done_uri, {"rows": rows, "last_uri": last or self._last_uri(rows),
                                               **problems.to_json()})
        return rows, problems

    def read(self, index: int, rows: int) -> pa.Table:
        return read_chunk(self.chunk(index), index, rows, self.storage)

    def mend(self, rows: dict[int, int], damaged: int) -> list[int]:
        """List again chunk ``damaged`` and every other chunk of the listing (``rows``: rows per
        chunk) whose metadata cannot be read or does not match, each run of them from the chunk
        before it. Returns the chunks written. Raises :class:`SourceError` when the sources no
        longer list the same way around a run (they changed since they were listed): its chunks
        then cannot be listed again alone. Images that list after the last image of a finished
        listing are new ones, which it leaves out as it did before (its last chunk is mended)."""
        footers = {i: self._footer(i) for i in rows}
        bad = {damaged} | {i for i in rows if not self._sound(footers[i], i, rows[i])}
        try:  # where the finished listing ended: the last chunk must end there too
            finished_at = self._done().get("last_uri")
        except DAMAGE:  # unknown: nothing may list after the last chunk
            finished_at = None
        done = -1  # the last chunk written: a run that grew into the next one has listed it already
        for first in sorted(i for i in bad if i - 1 not in bad):
            if first > done:
                done = self._relist_from(first, rows, bad, footers.get(first - 1), finished_at)
        return sorted(bad)

    # -- internals ---------------------------------------------------------------------
    def _items(self, problems: ListingProblems, cursor: ListingCursor) -> Iterator[Listed]:
        return iter_listed(self.sources, self.storage, sniff=self.sniff, uri_column=self.uri_column,
                           problems=problems, cursor=cursor)

    @functools.cached_property
    def _digest(self) -> str:
        """The sources' hash, stored in each chunk's footer."""
        return hashlib.sha256(json.dumps(self.sources).encode()).hexdigest()

    def _write_chunk(self, index: int, batch: list[Listed], cursor: ListingCursor, rows: dict[int, int]) -> None:
        """Chunk ``index`` of ``batch``, with where the listing stood after it: ``cursor`` and the
        short chunks up to it (only a listing's last chunk is short, but a listing that ended
        before its _DONE was written, of sources that have grown since, goes on after it)."""
        table = pa.table({"chunk": pa.array([index] * len(batch), pa.int64()),
                          "row": pa.array(np.arange(len(batch)), pa.int64()),
                          "uri": pa.array([item.uri for item in batch], pa.string()),
                          "span_start": pa.array([item.span[0] if item.span else -1 for item in batch], pa.int64()),
                          "span_end": pa.array([item.span[1] if item.span else -1 for item in batch], pa.int64())})
        short = {str(i): n for i, n in rows.items() if i <= index and n < self.chunk_size}
        where = {"sources": self._digest, "chunk_size": self.chunk_size, "cursor": cursor.to_json(),
                 "format": _FORMAT, "short": short}
        self.storage.write_bytes(self.chunk(index), parquet_bytes(table, {_WHERE: json.dumps(where)}))

    def _footer(self, index: int) -> pq.FileMetaData | None:
        """Chunk ``index``'s Parquet footer; None when it cannot be read."""
        try:
            with self.storage.open(self.chunk(index), "rb") as f:
                return pq.ParquetFile(f).metadata
        except (*DAMAGE, OSError, pa.ArrowException):
            return None

    def _where(self, footer: pq.FileMetaData) -> dict | None:
        """Where the listing stood after a chunk, from its footer; None when it has none."""
        try:
            return json.loads((footer.metadata or {})[_WHERE.encode()])
        except (KeyError, ValueError):
            return None

    def _ours(self, where: dict) -> bool:
        """Whether a chunk is of this listing, not one of other sources, chunk size or format."""
        return (where.get("sources") == self._digest and where.get("chunk_size") == self.chunk_size
                and where.get("format") == _FORMAT)

    def _sound(self, footer: pq.FileMetaData | None, index: int, rows: int) -> bool:
        """Whether chunk ``index`` looks whole from its ``footer`` (None: unreadable): of this
        listing, with ``rows`` rows, all of them (by the column statistics) rows of chunk ``index``."""
        if footer is None or footer.num_rows != rows or (where := self._where(footer)) is None or not self._ours(where):
            return False
        names = footer.schema.names
        if "chunk" not in names:
            return False
        column = names.index("chunk")
        for group in range(footer.num_row_groups):
            stats = footer.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max or stats.min != index or stats.max != index:
                return False
        return True

    def _listed_so_far(self) -> tuple[dict[int, int], ListingCursor]:
        """The rows of the whole chunks an unfinished listing of these sources wrote (0, 1, ...
        without a gap), and the cursor stored with the last of them; nothing to reuse: ({}, start).
        A chunk whose footer cannot be read is listed again; one of another listing (other
        sources, chunk size or format) means the listing starts anew."""
        present = chunk_indices(self.root, self.storage)
        count = 0
        while count in present:
            count += 1
        for last in range(count - 1, -1, -1):
            if (footer := self._footer(last)) is None or (where := self._where(footer)) is None:
                continue
            if not self._ours(where):
                break
            short = where.get("short", {})
            rows = {i: int(short.get(str(i), self.chunk_size)) for i in range(last)}
            rows[last] = footer.num_rows
            return rows, ListingCursor.from_json(where["cursor"])
        return {}, ListingCursor()

    def _relist_from(self, index: int, rows: dict[int, int], bad: set[int], before: pq.FileMetaData | None,
                     finished_at: str | None) -> int:
        """Write chunks ``index``, ``index + 1``, ... while they are in ``bad``, from where the
        chunk before them left the listing (``before``: its footer, sound, as it is not in bad;
        None for chunk 0); the next image listed must then be the first of the next chunk. The
        last chunk must end at ``finished_at``, the URI a finished listing listed last (kept in
        _DONE.json), whatever lists after it; without it, nothing may list after it.
        Returns the last chunk written."""
        cursor = ListingCursor()
        if index:
            cursor = ListingCursor.from_json(self._where(before)["cursor"])
        items = self._items(cursor.problems.copy(), cursor)
        while True:
            batch = list(itertools.islice(items, rows[index]))
            if len(batch) != rows[index]:
                self._changed(index)
            after = ListingCursor.from_json(cursor.to_json())
            following = next(items, None)
            # As write() did: the last chunk, when short, once the sources ran out; any other at once. (A
            # short chunk before others, of sources that grew, now gets where it ended: the same image next.)
            self._write_chunk(index, batch, cursor if following is None and len(batch) < self.chunk_size else after,
                              rows)
            index += 1
            head = None  # after the last chunk: the sources must have run out
            if index in rows and index not in bad:
                try:
                    head = self.read(index, rows[index]).column("uri")[0].as_py()
                except DamagedListing:  # listed again with the others
                    bad.add(index)
            if index in bad:
                items = itertools.chain([] if following is None else [following], items)
                continue
            if index not in rows and finished_at is not None:  # the last chunk ends where the listing did
                changed = batch[-1].uri != finished_at  # (and images listed after it are new ones)
            else:
                changed = (None if following is None else following.uri) != head
            if changed:
                self._changed(index - 1)
            return index - 1

    def _done(self) -> dict:
        """_DONE.json, the mark of a finished listing; a ValueError when it is not an object."""
        done = self.storage.read_json(Storage.join(self.root, _DONE))
        if not isinstance(done, dict):
            raise ValueError(f"a JSON {type(done).__name__}, not an object")
        return done

    def _last_uri(self, rows: dict[int, int]) -> str | None:
        """The URI of the last row of the last chunk (None when that chunk is damaged)."""
        last = max(rows)
        try:
            return self.read(last, rows[last]).column("uri")[-1].as_py()
        except DamagedListing:
            return None

    def _changed(self, index: int) -> NoReturn:
        raise SourceError(f"listing chunk {self.chunk(index)} was damaged, and the sources no longer list the "
                          f"same way around it (they changed since they were listed), so it cannot be listed "
                          f"again alone; run the stage with --force to list and embed them anew")
