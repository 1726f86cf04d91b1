"""Write shards from the plan: one tar per job, byte-reproducible, never visible half-written.

A shard is built in a temp file (in the destination folder for local output, in local
scratch for S3), hashed while it is written, then renamed into place or uploaded to its
final key with retries, and checked there. Only then is its record saved, with the shard's
sha256 and the version of the object written (``Storage.stat``: its ETag and size on S3,
its modification time, size and the machine's boot locally). A rerun keeps a shard that is
still that version for one stat, without reading it. A shard of another version (copied with
the run dir, recorded before versions were kept, or on a machine restarted since) is read
through: kept when its sha256 is the record's, which then takes the new version, else
written again, as is a shard without a record. ``vfm verify`` re-reads every shard, and
removes the record of each bad one, so that the next run of the stage writes it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from data_curation.shards.encode import BadImage, EncodeOptions, stored_image
from data_curation.shards.index import INDEX_SCHEMA, SHARDS_FOLDER, ShardRecord, load_record, save_record
from data_curation.shards.members import BLOCK, archive_end, member_header, padded
from data_curation.shards.plan import plan_spans, shard_name
from data_curation.shards.verify import shard_sha256
from data_curation.sources import Span, read_many
from data_curation.storage import Storage, StorageError


class ShardUploadError(RuntimeError):
    """A finished shard could not be put at its destination, even after retries."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.5  # doubled after each failed attempt


@dataclass(frozen=True)
class ShardJob:
    """One shard to make: its name, final URI, planned samples (plan rows) and their digest, and
    the samples' tar spans (where to read a tar member alone; not part of the digest: a read
    hint, not content)."""

    name: str
    uri: str
    samples: list[dict]
    plan_digest: str
    spans: list[Span | None] = field(default_factory=list)


@dataclass
class GroupOutcome:
    """What a group of shard jobs did: records of all its shards, and which were kept or (re)written."""

    records: list[ShardRecord] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # written: no file under the shard's name
    mismatching: list[str] = field(default_factory=list)  # rewritten: a file not matching its record or plan


def shard_jobs(plan: pa.Table, shard_dir: str, prefix: str, options: EncodeOptions) -> list[ShardJob]:
    """The plan cut into one job per shard, in shard order."""
    rows = plan.select(["id", "uri", "sha256", "width", "height", "selected_by", "clusters", "shard"]).to_pylist()
    by_shard: dict[int, list[tuple[dict, Span | None]]] = {}
    for row, span in zip(rows, plan_spans(plan), strict=True):
        by_shard.setdefault(row.pop("shard"), []).append((row, span))
    jobs = []
    for number in sorted(by_shard):
        samples = [row for row, _ in by_shard[number]]
        digest = hashlib.sha256(json.dumps([samples, asdict(options)], sort_keys=True).encode()).hexdigest()
        name = shard_name(prefix, number)
        jobs.append(ShardJob(name, Storage.join(shard_dir, SHARDS_FOLDER, name), samples, digest,
                             [span for _, span in by_shard[number]]))
    return jobs


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.offset = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        self.raw.write(data)
        self.sha256.update(data)
        self.offset += len(data)


def _member(name: str, data: bytes) -> bytes:
    """One tar member: header, data, zero padding."""
    return b"".join((member_header(name, len(data)), data, bytes(padded(len(data)) - len(data))))


def _metadata(sample: dict, width: int, height: int) -> bytes:
    meta = {"id": sample["id"], "uri": sample["uri"], "selected_by": sample["selected_by"],
            "cluster_ids": {f"l{level + 1}": c for level, c in enumerate(sample["clusters"])},
            "width": width, "height": height}
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def build_shard(job: ShardJob, out: _HashingFile, storage: Storage, options: EncodeOptions
                ) -> tuple[list[dict], Counter, int]:
    """Write the tar of ``job`` to ``out``; returns its index rows, the counts of skipped samples by
    reason, and how many images were re-encoded."""
    rows, skipped, reencoded = [], Counter(), 0
    # One read for the whole shard (tar members by their spans, those without one from one pass
    # over their tar); at most about the shard's byte cap is held at once.
    sources = read_many([sample["uri"] for sample in job.samples], storage, job.spans or None)
    for sample, source in zip(job.samples, sources, strict=True):
        if isinstance(source, FileNotFoundError):
            skipped["missing"] += 1
            continue
        if isinstance(source, tarfile.TarError | PermissionError):  # a broken tar, an archived object
            skipped["unreadable"] += 1
            continue
        if isinstance(source, Exception):  # storage trouble, not bad data: fail, and the rerun resumes
            raise source
        if hashlib.sha256(source).hexdigest() != sample["sha256"]:
            skipped["changed"] += 1
            continue
        try:
            known = (sample["width"], sample["height"]) if sample["width"] and sample["height"] else None
            image = stored_image(source, options, known)
        except BadImage:
            skipped["undecodable"] += 1
            continue
        reencoded += image.reencoded
        key = sample["id"]
        start = out.offset
        meta = _metadata(sample, image.width, image.height)
        image_member = _member(f"{key}.{image.extension}", image.data)
        json_member = _member(f"{key}.json", meta)
        out.write(image_member)
        out.write(json_member)
        rows.append({"key": key, "shard": job.name, "sample": len(rows), "offset": start,
                     "size": out.offset - start, "image_ext": image.extension, "image_offset": start + BLOCK,
                     "image_size": len(image.data), "json_offset": start + len(image_member) + BLOCK,
                     "json_size": len(meta),
                     "sha256": hashlib.sha256(image.data).hexdigest() if image.reencoded else sample["sha256"],
                     "crc32": zlib.crc32(json_member, zlib.crc32(image_member))})
    out.write(archive_end(out.offset))
    return rows, skipped, reencoded


def _put_with_retries(local: Path, job: ShardJob, size: int, storage: Storage, retry: RetryPolicy) -> str:
    """Upload the finished shard ``local`` to ``job.uri``; returns the version of it there."""
    error: Exception | None = None
    for attempt in range(retry.attempts):
        if attempt:
            time.sleep(retry.backoff_s * 2 ** (attempt - 1))
        try:
            storage.put_file(local, job.uri)
            stored, version = storage.stat(job.uri)
            if stored == size:
                return version
            error = StorageError(f"{job.uri} has the wrong size after upload")
        except (StorageError, OSError) as exc:
            error = exc
    raise ShardUploadError(f"shard {job.name}: upload to {job.uri} failed after {retry.attempts} attempts: {error}")


def write_shard(job: ShardJob, storage: Storage, options: EncodeOptions, scratch_dir: Path,
                retry: RetryPolicy = RetryPolicy()) -> ShardRecord:
    """Make the shard of ``job`` at ``job.uri`` and return its record (not yet saved)."""
    remote = Storage.is_remote(job.uri)
    folder = scratch_dir if remote else Path(job.uri.removeprefix("file://")).parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{job.name}.*.tmp"):  # left by a killed attempt at this shard
        stale.unlink(missing_ok=True)
    temp = folder / f".{job.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # No fsync (it costs the writer about a sixth of its speed): a local version holds the
        # machine's boot, so after a crash, which may have lost pages not yet on disk, a rerun
        # reads each shard through and rewrites the ones whose sha256 is not their record's.
        with open(temp, "wb") as raw:
            out = _HashingFile(raw)
            rows, skipped, reencoded = build_shard(job, out, storage, options)
        if remote:
            version = _put_with_retries(temp, job, out.offset, storage, retry)
        else:
            os.replace(temp, folder / job.name)
            version = storage.version(job.uri)
    finally:
        temp.unlink(missing_ok=True)
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return ShardRecord(job.name, len(rows), out.offset, out.sha256.hexdigest(), job.plan_digest, table,
                       dict(skipped), reencoded, version)


def tidy_shard_folder(shard_dir: str, planned: set[str], storage: Storage) -> int:
    """Delete what a killed writer or an older plan left in the shard folder (temp files, shards no
    longer planned); returns how many files went."""
    folder = Storage.join(shard_dir, SHARDS_FOLDER)
    leftovers = [uri for uri in storage.ls(folder) if uri.rstrip("/").rsplit("/", 1)[-1] not in planned]
    for uri in leftovers:
        storage.rm(uri)
    return len(leftovers)


def _stat(uri: str, storage: Storage) -> tuple[int, str] | None:
    """:meth:`Storage.stat` of ``uri`` (size, version), None when nothing is there."""
    try:
        return storage.stat(uri)
    except FileNotFoundError:
        return None


def _matches(job: ShardJob, record: ShardRecord, size: int, version: str, storage: Storage) -> bool:
    """Whether the shard at ``job.uri``, now of ``size`` bytes at ``version``, is the one ``record``
    describes, for this plan: the very object written, or else the same bytes."""
    if record.plan_digest != job.plan_digest:
        return False
    if record.version == version:
        return True
    return size == record.bytes and shard_sha256(job.uri, storage) == record.sha256


def write_shard_group(jobs: list[ShardJob], record_dir: str, storage: Storage, options: EncodeOptions,
                      scratch_dir: Path, retry: RetryPolicy = RetryPolicy()) -> GroupOutcome:
    """Make sure every shard of ``jobs`` exists and matches its record: keep intact ones, write the rest."""
    outcome = GroupOutcome()
    for job in jobs:
        record = load_record(record_dir, job.name, storage)
        now = _stat(job.uri, storage)
        if record is not None and now is not None and _matches(job, record, *now, storage):
            if record.version != now[1]:  # checked by its bytes: the next rerun checks its version alone
                record.version = now[1]
                save_record(record, record_dir, storage)
            outcome.kept.append(job.name)
        else:
            (outcome.missing if now is None else outcome.mismatching).append(job.name)
            record = write_shard(job, storage, options, scratch_dir, retry)
            save_record(record, record_dir, storage)
            outcome.written.append(job.name)
        outcome.records.append(record)
    return outcome
