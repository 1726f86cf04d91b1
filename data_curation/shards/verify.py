"""Re-read every shard and check it against shards.json and index.parquet (what ``vfm verify`` runs).

Per shard: it exists, has the listed size and sha256, and each indexed sample sits at its
offsets with the expected member names, sizes, image sha256 and sample CRC-32. A bad shard
is reported by name with the first reason found and how many of its samples are bad.
"""
from __future__ import annotations

import hashlib
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from data_curation.shards.index import SHARD_LIST_FILE, read_index, read_shard_list
from data_curation.shards.members import BadMember, sample_members
from data_curation.storage import Storage

_CHUNK = 1 << 22


def shard_sha256(uri: str, storage: Storage) -> str:
    """sha256 of the object at ``uri``, streamed."""
    h = hashlib.sha256()
    with storage.open(uri, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_shards`: counts and the bad shards by name with a reason."""

    shards: int = 0
    samples: int = 0
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_dict(self) -> dict:
        return {"ok": self.ok, "shards": self.shards, "samples": self.samples, "bad_shards": dict(self.bad)}

    def summary(self) -> str:
        """One line of counts; the bad shards themselves are in ``bad``."""
        verdict = "all good" if self.ok else f"{len(self.bad)} bad"
        return f"{self.shards} shards, {self.samples} samples checked: {verdict}"


def bad_samples(data: bytes, rows: list[dict]) -> list[tuple[str, str]]:
    """(key, reason) for each index row whose members in ``data`` do not match it."""
    bad = []
    for row in rows:
        try:
            found = sample_members(data, row["offset"], row["key"], row["image_ext"])
            indexed = ((row["image_offset"], row["image_size"]), (row["json_offset"], row["json_size"]))
            if found != indexed:
                raise BadMember(f"members at {found}, the index says {indexed}")
            image = data[row["image_offset"]:row["image_offset"] + row["image_size"]]
            if hashlib.sha256(image).hexdigest() != row["sha256"]:
                raise BadMember("image sha256 differs from the index")
            crc = row.get("crc32")  # None in an index written before the column existed
            if crc is not None and zlib.crc32(data[row["offset"]:row["offset"] + row["size"]]) != crc:
                raise BadMember("sample CRC-32 differs from the index")
        except BadMember as exc:
            bad.append((row["key"], str(exc)))
    return bad


def _check_shard(entry: dict, rows: list[dict], storage: Storage) -> str | None:
    """The reason shard ``entry`` is bad, or None when it is good."""
    if not storage.exists(entry["uri"]):
        return "missing"
    data = storage.read_bytes(entry["uri"])
    problems = []
    if len(data) != entry["filesize"]:
        problems.append(f"size {len(data)}, expected {entry['filesize']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append("sha256 mismatch")
    if len(rows) != entry["nsamples"]:
        problems.append(f"index has {len(rows)} samples, shard list says {entry['nsamples']}")
    bad = bad_samples(data, rows)
    if bad:
        problems.append(f"{len(bad)} bad sample(s), first {bad[0][0]}: {bad[0][1]}")
    return "; ".join(problems) or None


def verify_shards(shard_dir: str, storage: Storage | None = None, workers: int = 4) -> VerifyReport:
    """Check every shard listed in ``shard_dir``/shards.json against the index.

    ``shard_dir`` is the shard stage's folder (RUN_DIR/shard). Raises FileNotFoundError, with
    one line naming the folder, when it holds no shards.json.
    """
    storage = storage or Storage()
    if not storage.exists(Storage.join(shard_dir, SHARD_LIST_FILE)):
        raise FileNotFoundError(f"{shard_dir} holds no {SHARD_LIST_FILE}: its shards were never finished")
    entries = read_shard_list(shard_dir, storage)
    index: pa.Table = read_index(shard_dir, storage)
    rows_by_shard: dict[str, list[dict]] = {}
    for row in index.to_pylist():
        rows_by_shard.setdefault(row["shard"], []).append(row)
    names = [e["url"].rsplit("/", 1)[-1] for e in entries]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda e, n: _check_shard(e, rows_by_shard.get(n, []), storage), entries, names))
    report = VerifyReport(shards=len(entries), samples=index.num_rows)
    report.bad = {name: reason for name, reason in zip(names, reasons, strict=True) if reason}
    return report
