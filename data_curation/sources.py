"""Image sources: stream the URIs of a raw pool and read their bytes.

A source is one URI string:

- a folder or an s3:// prefix: every file below it, recursively. Files with an image
  extension are taken as they are (a non-image among them is rejected later by decoding,
  with a reason); files without one are sniffed (first bytes) when ``sniff`` is on.
  ``.tar`` files found there (``.tar.gz``, ``.tgz`` too) are WebDataset shards and are
  expanded into their members. Hidden files and folders are left out; on a local disk,
  symlinks are followed (see :meth:`Storage.walk_files`).
- a ``.parquet`` or ``.csv`` file: a list of URIs in column ``uri_column``; relative
  entries are taken relative to the list's folder.
- a ``.tar`` file (``.tar.gz``, ``.tgz``): a WebDataset shard; its image members are the
  items. A member name that comes again in the same tar is listed once, for its first
  member (a reader of the name gets that one).

Listing is a generator: nothing holds the whole pool's names at once. A tar member's URI
is fsspec's chained form ``tar://MEMBER::TAR_URI``. :func:`iter_listed` also gives each
member of an uncompressed tar its byte span in the tar, by which :func:`read_many` reads it
(a batch's consecutive members as one range: one ranged GET on S3) instead of streaming the
tar from its start up to the member; members without a span (gzipped tars, or a span that no
longer matches the tar) are read in one pass over their tar.

Bad items met while listing are skipped and recorded in a :class:`ListingProblems`, never
fatal: blank or malformed rows of a URI list (not UTF-8, or swallowing line breaks), tars
that cannot be read to their end (truncated, a garbled header, not a tar at all), whose
members before the break are still listed, tars that repeat member names, and what a folder
walk leaves out (a subfolder without read permission, a symlink loop, a FIFO).

A :class:`ListingCursor` follows a listing as it goes, so that a listing stopped part way
(millions of keys under one prefix take hours) picks up where it was instead of starting over.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from data_curation.storage import Storage, is_utf8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                    ".pbm", ".avif", ".jp2", ".j2k")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")  # WebDataset shards, plain or gzipped

# Leading bytes of the formats Pillow reads that we accept without an extension.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"P1", b"P2", b"P3", b"P4", b"P5", b"P6",
          b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 (JP2 box)
          b"\xffO\xffQ")  # JPEG 2000 codestream (J2K)
_AVIF_BRANDS = (b"ftypavif", b"ftypavis")  # ISO-BMFF brand, after the 4-byte box size
_SNIFF_BYTES = 16


class SourceError(ValueError):
    """A source URI that cannot be listed; the message names it."""


Span = tuple[int, int]


class Listed(NamedTuple):
    """One listed image: its URI and, for a member of an uncompressed tar, the byte span
    [start, end) of its header blocks and data in the tar, which read alone are a one-member tar."""

    uri: str
    span: Span | None = None


@dataclass
class ListingProblems:
    """What listing skipped: blank or malformed rows of URI lists (counted), broken tars or
    tars with repeated member names, and entries a folder walk left out (one line each)."""

    bad_rows: int = 0
    broken_tars: list[str] = field(default_factory=list)
    skipped_paths: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rows = [f"{self.bad_rows} blank or malformed rows in URI lists"] if self.bad_rows else []
        return rows + self.broken_tars + self.skipped_paths

    def copy(self) -> ListingProblems:
        return ListingProblems(self.bad_rows, list(self.broken_tars), list(self.skipped_paths))

    def to_json(self) -> dict:
        return {"bad_rows": self.bad_rows, "broken_tars": self.broken_tars, "skipped_paths": self.skipped_paths}

    @classmethod
    def from_json(cls, obj: dict) -> ListingProblems:
        """From :meth:`to_json`, or from a run that kept no ``skipped_paths``."""
        return cls(int(obj.get("bad_rows", 0)), list(obj.get("broken_tars", [])), list(obj.get("skipped_paths", [])))


@dataclass
class ListingCursor:
    """Where a listing can pick up again; :func:`iter_sources` keeps it up to date as it yields.

    The point is the last entry of source number ``source`` that was listed in full (a file, or
    a tar with all its members, in a folder source; None: the source's start) and ``skip``, the
    images listed after that point (members of a tar, rows of a URI list: those restart from
    their beginning and skip them). ``problems`` are what listing had met up to that point;
    anything met after it is met again.
    """

    source: int = 0
    after: str | None = None
    skip: int = 0
    problems: ListingProblems = field(default_factory=ListingProblems)

    def reached(self, source: int, after: str | None, problems: ListingProblems) -> None:
        self.source, self.after, self.skip, self.problems = source, after, 0, problems.copy()

    def to_json(self) -> dict:
        return {"source": self.source, "after": self.after, "skip": self.skip, **self.problems.to_json()}

    @classmethod
    def from_json(cls, obj: dict) -> ListingCursor:
        return cls(int(obj["source"]), obj["after"], int(obj["skip"]), ListingProblems.from_json(obj))


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Marks its TarFile once a header read meets the end-of-archive zero block: past the
    first member, tarfile ends quietly on a truncated or garbled header, and this is how
    listing tells a complete archive from one that stops early."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.vfm_reached_end = True
            raise


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def has_tar_extension(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def looks_like_image(head: bytes) -> bool:
    """True when ``head`` (a file's first bytes) starts like an image Pillow reads."""
    if (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[4:12] in _AVIF_BRANDS:
        return True
    return head.startswith(_MAGIC)


def tar_member_uri(tar_uri: str, member: str) -> str:
    return f"tar://{member}::{tar_uri}"


def split_tar_member_uri(uri: str) -> tuple[str, str] | None:
    """(tar URI, member name) for a tar member URI, else None."""
    if not uri.startswith("tar://") or "::" not in uri:
        return None
    member, tar_uri = uri[len("tar://"):].split("::", 1)
    return tar_uri, member


def iter_source(source: str, storage: Storage | None = None, *, sniff: bool = True,
                uri_column: str = "uri", problems: ListingProblems | None = None) -> Iterator[str]:
    """Yield the image URIs of one source, in a stable order (sorted per folder); what is
    skipped goes to ``problems``."""
    return iter_sources([source], storage, sniff=sniff, uri_column=uri_column, problems=problems)


def iter_sources(sources: Iterable[str], storage: Storage | None = None, *, sniff: bool = True,
                 uri_column: str = "uri", problems: ListingProblems | None = None,
                 cursor: ListingCursor | None = None) -> Iterator[str]:
    """Yield the image URIs of each source in turn: :func:`iter_listed` without the spans."""
    for item in iter_listed(sources, storage, sniff=sniff, uri_column=uri_column, problems=problems, cursor=cursor):
        yield item.uri


def iter_listed(sources: Iterable[str], storage: Storage | None = None, *, sniff: bool = True,
                uri_column: str = "uri", problems: ListingProblems | None = None,
                cursor: ListingCursor | None = None) -> Iterator[Listed]:
    """Yield the images of each source in turn, with their tar spans. From a ``cursor``, start
    at the point it holds, and keep it at the point after each image yielded (``problems``
    should then start as a copy of the cursor's)."""
    storage = storage or Storage()
    problems = ListingProblems() if problems is None else problems
    cursor = ListingCursor() if cursor is None else cursor
    sources = list(sources)
    to_skip = cursor.skip
    for index in range(cursor.source, len(sources)):
        if index != cursor.source:
            cursor.reached(index, None, problems)
        for item, done in _items(sources[index], storage, sniff, uri_column, problems, cursor.after):
            if item is not None:
                if to_skip:
                    to_skip -= 1
                else:
                    cursor.skip += 1
                    yield item
            if done is not None:
                cursor.reached(index, done, problems)
                to_skip = 0


_Item = tuple[Listed | None, str | None]  # (an image to list, a folder entry now listed in full)


def _items(source: str, storage: Storage, sniff: bool, uri_column: str, problems: ListingProblems,
           after: str | None) -> Iterator[_Item]:
    lower = source.lower()
    if lower.endswith(".parquet") or lower.endswith(".csv"):
        if not storage.exists(source):
            raise SourceError(f"source list {source} does not exist")
        yield from ((Listed(uri), None) for uri in _iter_uri_list(source, storage, uri_column, problems))
    elif has_tar_extension(source):
        if not storage.exists(source):
            raise SourceError(f"source tar {source} does not exist")
        yield from ((item, None) for item in _iter_tar(source, storage, problems))
    else:
        if not storage.isdir(source):
            if not storage.exists(source):
                raise SourceError(f"source {source} does not exist")
            raise SourceError(f"source {source} is neither a folder, a .tar (.tar.gz, .tgz), "
                              f"nor a .parquet/.csv list of URIs")
        yield from _folder_items(source, storage, sniff, problems, after)


def _folder_items(root: str, storage: Storage, sniff: bool, problems: ListingProblems,
                  after: str | None) -> Iterator[_Item]:
    for uri in storage.walk_files(root, after=after, skipped=problems.skipped_paths.append):
        name = posixpath.basename(uri)
        if has_tar_extension(name):
            yield from ((member, None) for member in _iter_tar(uri, storage, problems))
            yield None, uri
        elif has_image_extension(name) or (sniff and _sniff(uri, storage)):
            yield Listed(uri), uri
        else:
            yield None, uri


def _sniff(uri: str, storage: Storage) -> bool:
    try:
        with storage.open(uri, "rb") as f:
            return looks_like_image(f.read(_SNIFF_BYTES))
    except OSError:
        return False  # unreadable and nameless: not recognisably an image, so not listed


def _iter_tar(tar_uri: str, storage: Storage, problems: ListingProblems) -> Iterator[Listed]:
    listed: set[str] = set()  # a tar's member names: thousands, not millions
    repeated = 0
    unnamed = {"is not UTF-8": 0, "holds '::' (a tar member URI's separator)": 0}  # members no URI can name
    try:
        with storage.open(tar_uri, "rb") as f, \
                tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
            plain = getattr(tar.fileobj, "comptype", None) == "tar"  # not gzipped: members can be read alone
            for member in tar:
                if member.isfile() and has_image_extension(member.name):
                    if not is_utf8(member.name):  # a listing and a manifest hold UTF-8 text
                        unnamed["is not UTF-8"] += 1
                        continue
                    if "::" in member.name:
                        unnamed["holds '::' (a tar member URI's separator)"] += 1
                        continue
                    if member.name in listed:
                        repeated += 1
                        continue
                    listed.add(member.name)
                    span = (member.offset, member.offset_data + member.size) if plain else None
                    yield Listed(tar_member_uri(tar_uri, member.name), span)
            if not getattr(tar, "vfm_reached_end", False):
                problems.broken_tars.append(f"tar {tar_uri} ends early (truncated or a garbled header): "
                                            f"{len(listed)} images listed before the break")
    except (tarfile.TarError, EOFError) as exc:  # a bad archive (gzip's errors too); an I/O error stops the listing
        problems.broken_tars.append(f"tar {tar_uri} cannot be read past {len(listed)} images: {exc}")
    if repeated:
        problems.broken_tars.append(f"tar {tar_uri} repeats {repeated} image member names: "
                                    f"only the first member of each name is listed")
    for why, count in unnamed.items():
        if count:
            problems.broken_tars.append(f"tar {tar_uri} has {count} image member{'s' * (count != 1)} "
                                        f"with a name that {why}: not listed")


def _iter_uri_list(list_uri: str, storage: Storage, column: str, problems: ListingProblems) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    short_rows: list[str] = []  # URIs of rows short of the header's later columns, not yet yielded

    def skip_malformed(row) -> str:
        # A row short of later columns still has its URI (pandas fills the rest): kept. One with
        # more fields than the header (an unquoted comma?) cannot say which is the URI: bad.
        fields: list[str] = []
        if row.actual_columns < row.expected_columns:
            try:
                fields = next(csv.reader([row.text]), [])
            except csv.Error:  # a field past csv's size limit: this row is bad, not the list
                pass
        if uri_index < len(fields):
            short_rows.append(fields[uri_index])
        else:
            problems.bad_rows += 1
        return "skip"

    def csv_values(batches) -> Iterator[list]:
        # Short rows come after the batch read when the reader met them (it parses a block
        # ahead, of a fixed size): not their place in the file, but the same place every time,
        # as resuming a listing needs. Those met after the last batch (all of them, when no
        # row is whole) come last.
        for batch in batches:
            values = batch.column(0).to_pylist() + short_rows  # the one column read: the URIs
            short_rows.clear()
            yield values
        yield list(short_rows)

    # A relative entry is relative to the list's folder; on a local disk, made absolute there, so
    # that the listing and the manifest do not depend on the folder the run was started in.
    base = list_uri.rsplit("/", 1)[0] if Storage.is_remote(list_uri) else os.path.dirname(
        os.path.abspath(list_uri.removeprefix("file://")))
    try:
        with storage.open(list_uri, "rb") as f:
            if list_uri.lower().endswith(".parquet"):
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                value_lists = (b.column(0).to_pylist() for b in pf.iter_batches(columns=[column], batch_size=65536)
                               ) if column in names else None
            else:  # URIs as bytes, decoded row by row (a column of "0001" is not the number 1, and
                # one row that is not UTF-8 is one bad row, not an unreadable list); only that column
                # is converted, so a value in another column that its inferred type cannot hold is
                # no error, and a blank line is a row, counted as a bad one
                names = pacsv.open_csv(f, parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                                       convert_options=pacsv.ConvertOptions(check_utf8=False)).schema.names
                f.seek(0)
                uri_index = names.index(column) if column in names else -1
                # One thread: the handler sees rows in file order, the same way every time.
                value_lists = None if column not in names else csv_values(pacsv.open_csv(
                    f, read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 20),
                    parse_options=pacsv.ParseOptions(invalid_row_handler=skip_malformed, ignore_empty_lines=False),
                    convert_options=pacsv.ConvertOptions(column_types={column: pa.binary()}, include_columns=[column],
                                                         check_utf8=False)))
            if value_lists is None:
                raise SourceError(f"source list {list_uri} has no column {column!r} (columns: {names})")
            for values in value_lists:
                for value in values:
                    if (uri := _list_entry(value)) is None:
                        problems.bad_rows += 1
                    else:
                        yield _resolve(base, uri)
    except pa.ArrowException as exc:
        raise SourceError(f"source list {list_uri} cannot be read: {exc}") from None


def _list_entry(value: str | bytes | None) -> str | None:
    """One row of a URI list, stripped; None for a bad row: empty, not UTF-8, or holding a line
    break or other control character (a quote left open in a CSV swallows the rows after it)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    uri = (value or "").strip()
    if not uri or any(ord(c) < 32 or c == "\x7f" for c in uri):
        return None
    return uri


def _resolve(base: str, uri: str) -> str:
    if "://" in uri or uri.startswith("/"):
        return uri
    return Storage.join(base, uri)


def read_many(uris: list[str], storage: Storage | None = None,
              spans: Sequence[Span | None] | None = None) -> list[bytes | Exception]:
    """The bytes of each URI, or the exception that reading it raised (never raises itself):
    see :meth:`Storage.read_many`; a tar that cannot be read gives its members its TarError.

    Tar members with a span (``spans[i]``, from :func:`iter_listed`) are read by their spans,
    those of one tar that lie close together (a decode batch of consecutive members) as one
    range, all together with the batch's plain files (concurrent GETs on S3). A member whose
    span does not hold it (the tar was rewritten or cut since it was listed, or breaks there)
    and one without a span are read in one pass over its tar with the other such members of
    that tar.
    """
    storage = storage or Storage()
    spans = [None] * len(uris) if spans is None else spans
    out: list[bytes | Exception] = [OSError("not read")] * len(uris)
    plain: list[int] = []
    members_of: dict[int, str] = {}  # index -> member name, for tar members
    ranged: dict[str, list[int]] = defaultdict(list)
    by_tar: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, uri in enumerate(uris):
        parts = split_tar_member_uri(uri)
        if parts is None:
            plain.append(i)
            continue
        members_of[i] = parts[1]
        if spans[i] is not None:
            ranged[parts[0]].append(i)
        else:
            by_tar[parts[0]][parts[1]].append(i)
    ranges = [(tar_uri, span, members) for tar_uri, indices in ranged.items()
              for span, members in _merged_spans(indices, spans)]
    reads = storage.read_many([uris[i] for i in plain] + [tar_uri for tar_uri, _, _ in ranges],
                              [None] * len(plain) + [span for _, span, _ in ranges])
    for i, data in zip(plain, reads[:len(plain)], strict=True):
        out[i] = data
    ranges_read = [tar_uri for (tar_uri, _, _), data in zip(ranges, reads[len(plain):], strict=True)
                   if isinstance(data, bytes)]
    for (tar_uri, (start, _), members), data in zip(ranges, reads[len(plain):], strict=True):
        for i in members:
            if isinstance(data, FileNotFoundError):  # the tar is gone
                out[i] = data
            elif isinstance(data, bytes) and (member := _member_in_span(
                    data[spans[i][0] - start:spans[i][1] - start], members_of[i])) is not None:
                out[i] = member
            else:  # not in its span any more, or a range the tar no longer has (S3: 416) or the
                # store's trouble: the pass over the tar tells these apart
                by_tar[tar_uri][members_of[i]].append(i)
    failed: dict[str, Exception] = {}
    for tar_uri, members in by_tar.items():
        if (exc := _read_tar_members(tar_uri, members, storage, out)) is not None:
            failed[tar_uri] = exc
    # A tar the store refused, like any object: its members are rejects when the refusal is the
    # tar's own (archived, or denied while its bucket served the batch's other reads), else the
    # store's trouble, a StorageError
    served = Storage.buckets_of([uris[i] for i in plain if isinstance(out[i], bytes)]
                                + ranges_read
                                + [tar_uri for tar_uri in by_tar if tar_uri not in failed])
    for tar_uri, exc in failed.items():
        exc = storage.read_failure(tar_uri, exc, served)
        for indices in by_tar[tar_uri].values():
            for i in indices:
                if not isinstance(out[i], bytes):
                    out[i] = exc
    return out


_SPAN_GAP = 256 * 1024  # bytes between two members' spans that are read through rather than asked for apart


def _merged_spans(indices: list[int], spans: Sequence[Span | None]) -> list[tuple[Span, list[int]]]:
    """The members ``indices`` of one tar as ranges to read, each with the members it holds:
    spans in tar order, merged where the gap between them is at most ``_SPAN_GAP``."""
    merged: list[tuple[list[int], list[int]]] = []  # ([start, end], members)
    for i in sorted(indices, key=lambda i: spans[i]):
        start, end = spans[i]
        if merged and start - merged[-1][0][1] <= _SPAN_GAP:
            merged[-1][0][1] = max(merged[-1][0][1], end)
            merged[-1][1].append(i)
        else:
            merged.append(([start, end], [i]))
    return [((start, end), members) for (start, end), members in merged]


def _member_in_span(data: bytes, name: str) -> bytes | None:
    """The data of member ``name`` when ``data`` (a span of a tar) is that member whole, else None."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            member = tar.firstmember
            if member is None or member.name != name or not member.isfile():
                return None
            handle = tar.extractfile(member)
            return handle.read() if handle is not None else None
    except (tarfile.TarError, EOFError):
        return None


def _read_tar_members(tar_uri: str, members: dict[str, list[int]], storage: Storage,
                      out: list[bytes | Exception]) -> Exception | None:
    """Fill ``out`` with the members' bytes; a member the tar lacks is a FileNotFoundError, and
    the members not read when the tar breaks get its TarError. Returns what else stopped the
    read (the store's or the object's refusal), for the caller to judge; None otherwise."""
    missing = set(members)
    try:
        with storage.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.name in missing:
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    for i in members[member.name]:
                        out[i] = data
                    missing.discard(member.name)
                    if not missing:
                        break
    except tarfile.TarError as exc:  # a tar's own damage rejects the members not yet read
        for name in missing:
            for i in members[name]:
                out[i] = exc
        return None
    except Exception as exc:
        return exc
    for name in missing:
        for i in members[name]:
            out[i] = FileNotFoundError(f"{name} not in {tar_uri}")
    return None
