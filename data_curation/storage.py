"""The one way vfm touches files: fsspec URIs, local paths and s3://, with atomic writes.

Local writes go to a temp file in the same folder and are renamed into place; S3 writes
are whole-object PUTs, so a reader never sees half an object. Errors from S3 that are not
OSErrors (botocore's EndpointConnectionError, ClientError on bad credentials) are turned
into :class:`StorageError` with one line that names the URI.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def boot_id() -> str:
    """This boot of the machine (Linux's boot id), "" where there is none to read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[1].split("/", 1)[0]


def _link_or_create(tmp: str, dest: Path) -> None:
    """Put the finished file ``tmp`` at ``dest`` unless something is there (FileExistsError):
    a hard link, or where the filesystem has none (SMB, some FUSE mounts) an exclusive create
    and copy, which a reader may see part written."""
    try:
        os.link(tmp, dest)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())


# Why an S3 GET fails that is the object's own, not the store's or the credentials'.
_ARCHIVED = "InvalidObjectState"  # Glacier / Deep Archive: every attempt fails alike until restored
_DENIED = "AccessDenied"  # the object's own only where the store serves other objects of its bucket


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs raised (it keeps botocore's as the cause)."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and (code := response.get("Error", {}).get("Code")):
            return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and the cause in one line."""

    @classmethod
    def of(cls, action: str, uri: str, cause: BaseException) -> StorageError:
        """``cannot ACTION URI: CauseType: first line of the cause``."""
        return cls(f"cannot {action} {uri}: {_describe(cause)}")


def _read_local_span(uri: str, start: int, end: int) -> bytes:
    with open(uri.removeprefix("file://"), "rb") as f:
        f.seek(start)
        return f.read(max(0, end - start))


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


_CHAINS = ("tar://", "zip://", "simplecache::", "filecache::", "blockcache::")


def _is_chained(uri: str) -> bool:
    """Whether ``uri`` is a chain of filesystems: a tar member's URI (tar://member::tar_uri), or
    one of fsspec's caches before another URL (simplecache::s3://...)."""
    return uri.startswith(_CHAINS) and "::" in uri


def is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (os and tarfile keep them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """``name`` with its bytes that are not UTF-8 written as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Storage:
    """Files by URI. ``s3`` holds s3fs options (endpoint_url, key, secret, region, ...)."""

    list_page_size = 1000  # keys per S3 ListObjectsV2 request in walk_files (the S3 maximum)

    def __init__(self, s3: dict[str, Any] | None = None):
        self.s3 = {k: v for k, v in (s3 or {}).items() if v not in (None, "")}

    # -- filesystems -----------------------------------------------------------------
    def options_for(self, uri: str) -> dict[str, Any]:
        """fsspec storage_options for ``uri``: the S3 options for s3://, nothing for local; for a chained
        URI (tar://member::s3://bucket/x.tar) the S3 options go to its s3 link."""
        if _is_chained(uri):
            links = uri.split("::")[1:]
            return {"s3": self.options_for("s3://")} if any(link.startswith("s3://") for link in links) else {}
        if uri.startswith(("s3://", "s3a://")):
            opts = dict(self.s3)
            region = opts.pop("region", None)
            endpoint = opts.pop("endpoint_url", None)
            client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
            if region:
                client_kwargs.setdefault("region_name", region)
            if endpoint:
                opts["endpoint_url"] = endpoint
            if client_kwargs:
                opts["client_kwargs"] = client_kwargs
            return opts
        return {}

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem for ``uri`` and the path within it. Only a tar member's URI is a chain
        of filesystems: elsewhere "::" is part of a name (an S3 key "10::00.png"), which fsspec
        would take for a chain, reading another key with none of the S3 options."""
        if _is_chained(uri):
            return fsspec.core.url_to_fs(uri, **self.options_for(uri))
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        cls = fsspec.get_filesystem_class(protocol)
        # What the URL itself says (an S3 versionId, an FTP host and login), as url_to_fs takes it.
        fs = fsspec.filesystem(protocol, **{**cls._get_kwargs_from_urls(uri), **self.options_for(uri)})
        return fs, fs._strip_protocol(uri)

    @staticmethod
    def join(base: str, *parts: str) -> str:
        if base.startswith("file://"):
            return "file://" + str(Path(base.removeprefix("file://"), *parts))
        if not _is_remote(base):
            return str(Path(base, *parts))
        return posixpath.join(base.rstrip("/"), *parts)

    @staticmethod
    def is_remote(uri: str) -> bool:
        return _is_remote(uri)

    def _guard(self, uri: str, action: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except Exception as exc:  # botocore errors are not OSErrors
            raise StorageError.of(action, uri, exc) from exc

    # -- reading ---------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return bool(self._guard(uri, "check", fs.exists, path))

    def isdir(self, uri: str) -> bool:
        fs, path = self.fs(uri)
        return bool(self._guard(uri, "check", fs.isdir, path))

    def stat(self, uri: str) -> tuple[int, str]:
        """The size of the object ``uri`` and a short tag of the version of it there: one that
        changes when it is written again. From its size and its ETag on S3 (asked of the store,
        not of a listing s3fs keeps); locally from its modification time in nanoseconds and the
        machine's boot, so that after a restart a file counts as another version (a crash may
        have lost pages not yet written, leaving the size and time as they were); elsewhere its
        modification or creation time. Raises FileNotFoundError when nothing is there."""
        if not _is_remote(uri):
            st = os.stat(uri.removeprefix("file://"))
            stamp, size = f"{boot_id()}:{st.st_mtime_ns}", st.st_size
        else:
            fs, path = self.fs(uri)
            info = self._guard(uri, "stat", fs.info, path, **({"refresh": True} if uri.startswith("s3") else {}))
            stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)), "")
            size = info.get("size")
        return int(size or 0), hashlib.sha256(f"{stamp}:{size}".encode()).hexdigest()[:16]

    def version(self, uri: str) -> str:
        """The version tag of :meth:`stat`."""
        return self.stat(uri)[1]

    def ls(self, uri: str) -> list[str]:
        """The URIs directly under ``uri`` (sorted); empty if it does not exist. Listed anew, not
        from s3fs's cache: other processes write here too (chunks, the run lock)."""
        fs, path = self.fs(uri)
        fs.invalidate_cache(path)
        if not self._guard(uri, "list", fs.exists, path):
            return []
        names = self._guard(uri, "list", fs.ls, path, detail=False)
        return sorted(self._unstrip(uri, path, n) for n in names if n.rstrip("/") != path.rstrip("/"))

    def walk_files(self, uri: str, after: str | None = None,
                   skipped: Callable[[str], None] | None = None) -> Iterator[str]:
        """Every file below the folder ``uri``, recursively, as URIs; nothing if ``uri`` does
        not exist. The order is fixed for a given store: on S3 the server's listing order (the
        byte order of the keys on AWS S3; SeaweedFS goes folder by folder), elsewhere the
        byte order of the paths, as AWS S3 lists them.

        Hidden entries (a name below ``uri`` that starts with ".": ``.DS_Store``, ``.git/``,
        ``.ipynb_checkpoints/``) are left out, with everything below them. On a local disk,
        symlinks are followed, into folders too (as torchvision's ImageFolder does), and their
        files keep the path through the link; left out, each with a line to ``skipped``: a
        folder below ``uri`` that cannot be listed (no permission), a symlink to a folder it
        is in (a loop), what is neither a file nor a folder (a FIFO, a socket, a device), and
        a file or folder whose name is not UTF-8 (a URI of it could not be written down). A
        broken symlink is listed like a file, for its reader to fail on.

        ``after``, a file URI this walk gave before, starts the walk after it without listing
        what comes before (S3's StartAfter; folders that sort before it are not opened).

        Streamed: on S3 one page of ``list_page_size`` keys at a time, straight from
        ListObjectsV2 (s3fs's own walk holds a whole prefix's listing in its directory cache
        for the life of the process: tens of millions of keys for a web-scale pool); elsewhere
        one folder's listing at a time.
        """
        fs, path = self.fs(uri)
        after_path = fs._strip_protocol(after) if after else None
        if uri.startswith(("s3://", "s3a://")):
            yield from self._walk_s3(uri, fs, path, after_path)
        else:
            walk = _FolderWalk(self, uri, fs, after_path, skipped or (lambda line: None))
            yield from walk.files(path, above=())

    def _walk_s3(self, uri: str, fs, path: str, after_path: str | None) -> Iterator[str]:
        bucket, key, _ = fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": self.list_page_size, **getattr(fs, "req_kw", {})}
        if after_path:
            request["StartAfter"] = fs.split_path(after_path)[1]
        while True:
            page = self._guard(uri, "list", fs.call_s3, "list_objects_v2", **request)
            for item in page.get("Contents", []):
                relative = item["Key"][len(prefix):]
                # a zero-byte "folder" marker is not a file
                if not relative.endswith("/") and not any(part.startswith(".") for part in relative.split("/")):
                    yield self._unstrip(uri, path, f"{bucket}/{item['Key']}")
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def read_bytes(self, uri: str) -> bytes:
        if not _is_remote(uri):  # fsspec costs ~50 us a call: most of the time of small local files
            return Path(uri.removeprefix("file://")).read_bytes()
        fs, path = self.fs(uri)
        return self._guard(uri, "read", fs.cat_file, path)

    def read_many(self, uris: list[str], spans: Sequence[tuple[int, int] | None] | None = None
                  ) -> list[bytes | Exception]:
        """The bytes of each URI, in order, or what reading it raised; never raises itself.
        ``spans``: for each URI, None for the whole file or (start, end) for its bytes
        [start, end) only (fewer where the file ends before ``end``).

        A file that does not exist is a FileNotFoundError (a local file's other troubles are its
        OSError), and so is an object's own refusal, a PermissionError: an archived object
        (Glacier: InvalidObjectState), or AccessDenied while the store serves other objects of
        the same bucket in this batch. Anything else on a remote store (unreachable, expired or
        wrong credentials, a whole bucket denied, failing after s3fs's retries) is a
        StorageError naming the URI, which callers treat as the store's trouble, not the file's.
        Remote files are fetched concurrently (fsspec's batched cat_ranges, which also takes
        ``[`` and ``*`` in keys literally); local ones in turn.
        """
        out: list[bytes | Exception] = [OSError("not read")] * len(uris)
        spans = [None] * len(uris) if spans is None else list(spans)
        remote: dict[str, list[int]] = {}
        for i, uri in enumerate(uris):
            if _is_remote(uri):
                remote.setdefault(uri.split("://", 1)[0], []).append(i)
                continue
            try:
                out[i] = self.read_bytes(uri) if spans[i] is None else _read_local_span(uri, *spans[i])
            except OSError as exc:
                out[i] = exc
        for rows in remote.values():
            fs, _ = self.fs(uris[rows[0]])
            starts = [None if spans[i] is None else spans[i][0] for i in rows]
            ends = [None if spans[i] is None else spans[i][1] for i in rows]
            try:
                blobs = fs.cat_ranges([fs._strip_protocol(uris[i]) for i in rows], starts, ends, on_error="return")
            except Exception as exc:  # the whole batch failed; each URI gets the error
                blobs = [exc] * len(rows)
            served = Storage.buckets_of([uris[i] for i, blob in zip(rows, blobs, strict=True) if isinstance(blob, bytes)])
            for i, blob in zip(rows, blobs, strict=True):
                out[i] = blob if isinstance(blob, bytes) else self.read_failure(uris[i], blob, served)
        return out

    @staticmethod
    def buckets_of(uris: list[str]) -> set[str]:
        """The buckets of the remote ones among ``uris``."""
        return {_bucket(uri) for uri in uris if _is_remote(uri)}

    @staticmethod
    def read_failure(uri: str, exc: Exception, served: set[str] = frozenset()) -> Exception:
        """What reading ``uri`` raised, as :meth:`read_many` reports it: a missing file and a local
        file's OSError stay as they are; the object's own refusal (an archived object, or
        AccessDenied where the store served other objects of its bucket, ``served``) is a
        PermissionError, even when it came wrapped in a StorageError; anything else on a remote
        store is the store's trouble, a StorageError naming ``uri``."""
        if isinstance(exc, FileNotFoundError) or not _is_remote(uri):
            return exc
        code = _s3_error_code(exc)
        if code == _ARCHIVED or (code == _DENIED and _bucket(uri) in served):
            return exc if isinstance(exc, PermissionError) else PermissionError(f"{uri}: {_describe(exc)}")
        return exc if isinstance(exc, StorageError) else StorageError.of("read", uri, exc)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))

    def open(self, uri: str, mode: str = "rb"):
        """A plain fsspec file object, for streaming; writes through it are not atomic."""
        fs, path = self.fs(uri)
        if "w" in mode and not _is_remote(uri):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return self._guard(uri, "open", fs.open, path, mode)

    def get_file(self, uri: str, local_path: str | Path) -> None:
        """Download ``uri`` to ``local_path`` through a temp file beside it, renamed into place
        once whole: a download cut off part way never leaves a file under the final name (a cache
        that reuses whatever exists would read it back truncated on every later attempt)."""
        fs, path = self.fs(uri)
        local = Path(local_path)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
        os.close(fd)
        try:
            self._guard(uri, "download", fs.get_file, path, tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- writing (atomic) ------------------------------------------------------------
    @staticmethod
    def _replace_local(uri: str, write: Callable[[BinaryIO], None],
                       place: Callable[[str, Path], None] = os.replace) -> None:
        """Write through ``write`` into a temp file beside the destination, fsync, then ``place``
        it there (rename over it; ``os.link`` fails instead when the destination exists)."""
        dest = Path(uri.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            place(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` to ``uri`` so that readers see the old object or the new, never half."""
        if _is_remote(uri):
            fs, path = self.fs(uri)
            self._guard(uri, "write", fs.pipe_file, path, data)
        else:
            self._replace_local(uri, lambda f: f.write(data))

    def create_bytes(self, uri: str, data: bytes) -> bool:
        """Write ``data`` to ``uri`` only if nothing is there, atomically: False if something
        was. Locally a hard link of a finished temp file; on S3 a conditional PUT (If-None-Match:
        *, which AWS S3, SeaweedFS and recent MinIO honour; a store that ignores it overwrites)."""
        if not _is_remote(uri):
            try:
                self._replace_local(uri, lambda f: f.write(data), place=_link_or_create)
            except FileExistsError:
                return False
            return True
        fs, path = self.fs(uri)
        try:
            fs.pipe_file(path, data, IfNoneMatch="*")
        except Exception as exc:
            # 409: another conditional write to the key is in flight (AWS), which wins or fails on its own
            if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StorageError.of("write", uri, exc) from exc
        return True

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def put_file(self, local_path: str | Path, uri: str) -> None:
        """Copy a finished local file to ``uri`` atomically (rename locally, one PUT on S3)."""
        if _is_remote(uri):
            fs, path = self.fs(uri)
            self._guard(uri, "upload", fs.put_file, str(local_path), path)
            return

        def copy(dst: BinaryIO) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)

        self._replace_local(uri, copy)

    def put_tree(self, local_dir: str | Path, uri: str) -> None:
        """Copy every file below ``local_dir`` to the same relative paths under ``uri``."""
        root = Path(local_dir)
        files = sorted(f for f in root.rglob("*") if f.is_file())
        relative = [f.relative_to(root).as_posix() for f in files]
        if _is_remote(uri):  # one batched, concurrent upload
            fs, path = self.fs(uri)
            self._guard(uri, "upload", fs.put, [str(f) for f in files], [posixpath.join(path, r) for r in relative])
            return
        for f, r in zip(files, relative, strict=True):
            self.put_file(f, self.join(uri, r))

    def makedirs(self, uri: str) -> None:
        if not _is_remote(uri):
            Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)

    def rm(self, uri: str, recursive: bool = False) -> None:
        """Remove ``uri`` (a folder too with ``recursive``); a missing path is not an error."""
        fs, path = self.fs(uri)
        if self._guard(uri, "check", fs.exists, path):
            self._guard(uri, "remove", fs.rm, path, recursive=recursive)

    @staticmethod
    def _unstrip(uri: str, path: str, name: str) -> str:
        """Turn a name fsspec returned (protocol stripped) back into a URI like ``uri``."""
        if not _is_remote(uri):
            return name
        protocol = uri.split("://", 1)[0]
        return f"{protocol}://{name.lstrip('/')}"


class _FolderWalk:
    """One :meth:`Storage.walk_files` of a folder on a filesystem other than S3 (see there)."""

    def __init__(self, storage: Storage, uri: str, fs, after_path: str | None, skipped: Callable[[str], None]):
        self.storage, self.uri, self.fs, self.after_path, self.skipped = storage, uri, fs, after_path, skipped
        self.local = isinstance(fs, LocalFileSystem)

    def files(self, path: str, above: tuple[str, ...]) -> Iterator[str]:
        """The files below ``path``; ``above``: the real paths of the folders walked into to get
        here (a symlink to one of them is a loop)."""
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:  # never was, or removed since its parent was listed
            return
        except PermissionError as exc:
            if not above:  # the source itself: nothing can be listed
                raise StorageError.of("list", self.uri, exc) from exc
            self.skipped(f"folder {self._name(path)} cannot be listed ({_describe(exc)}): not walked")
            return
        except StorageError:
            raise
        except Exception as exc:  # botocore errors are not OSErrors
            raise StorageError.of("list", self.uri, exc) from exc
        self.fs.invalidate_cache(path)  # keep no listing once it has been walked
        here = above + (os.path.realpath(path),) if self.local else above + (path,)
        # A folder sorts as "name/", so a depth-first walk visits paths in byte order, and
        # the paths of a walk can be compared with ``after_path`` as strings.
        keyed = []  # (sort key, path, kind, the line reporting an entry left out)
        for entry in entries:
            name = entry["name"].rstrip("/")
            base = posixpath.basename(name)
            if name != path.rstrip("/") and not base.startswith("."):
                kind, line = self._kind(entry, name, here)
                keyed.append((base + ("/" if kind == "folder" else ""), name, kind, line))
        after = self.after_path
        for _, name, kind, line in sorted(keyed):
            if kind == "folder":
                folder = name + "/"
                if after is None or after.startswith(folder) or folder > after:
                    yield from self.files(name, here)
            elif after is None or name > after:  # an entry left out is reported once, in walk order
                if line is None:
                    yield self.storage._unstrip(self.uri, path, name)
                else:
                    self.skipped(line)

    def _kind(self, entry: dict, name: str, here: tuple[str, ...]) -> tuple[str, str | None]:
        """("folder" or "file", None), or ("left out", the line that reports it)."""
        if not is_utf8(name):  # a listing, a manifest and a shard key hold UTF-8 text
            what = "folder" if entry["type"] == "directory" else "file"
            return "left out", f"{what} {printable(self._name(name))} has a name that is not UTF-8: not listed"
        if entry["type"] == "directory":
            return "folder", None
        if entry["type"] == "file" or not self.local:
            return "file", None
        if entry.get("islink"):
            try:
                target = os.stat(name).st_mode
            except OSError:
                return "file", None  # a broken link: its reader fails on it
            if stat.S_ISREG(target):
                return "file", None
            if not stat.S_ISDIR(target):
                return "left out", (f"{self._name(name)} links to {os.path.realpath(name)}, neither a file nor a "
                                    f"folder (a FIFO, a socket or a device): not listed")
            if os.path.realpath(name) not in here:
                return "folder", None
            return "left out", (f"folder {self._name(name)} links to {os.path.realpath(name)}, a folder it is in "
                                f"(a symlink loop): not walked")
        return "left out", f"{self._name(name)} is neither a file nor a folder (a FIFO, a socket or a device): not listed"

    def _name(self, path: str) -> str:
        return self.storage._unstrip(self.uri, path, path)
