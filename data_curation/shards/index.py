"""The shard index: one row per sample (where each member lies, its sha256) and one entry per shard.

The reader checks each sample against its ``crc32`` (headers, image and JSON in one pass,
several times cheaper than sha256 on the read path); ``vfm verify`` checks the sha256s.

Three forms of the same facts:
- a *record* per shard, written beside the stage's inner checkpoints right after the shard
  is in place; a shard counts as written only once its record exists;
- ``index.parquet``: all records' rows, in shard order, for verifying and seeking;
- ``shards.json``: the shard list in the wids format (``wids-shard-index-v1``: url and
  nsamples per shard, urls relative to the file) plus each shard's bytes and sha256.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from data_curation.storage import Storage

SHARDS_FOLDER = "shards"
INDEX_FILE = "index.parquet"
SHARD_LIST_FILE = "shards.json"

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),  # __key__ of the sample: the image id (sha256 of the source bytes)
    ("shard", pa.string()),  # shard file name, e.g. vfm-000003.tar
    ("sample", pa.int32()),  # place of the sample within its shard
    ("offset", pa.int64()),  # byte offset of the sample's first member header
    ("size", pa.int64()),  # bytes from ``offset`` to the end of the sample's last member
    ("image_ext", pa.string()),
    ("image_offset", pa.int64()),  # byte offset of the image data
    ("image_size", pa.int64()),
    ("json_offset", pa.int64()),
    ("json_size", pa.int64()),
    ("sha256", pa.string()),  # sha256 of the stored image bytes
    ("crc32", pa.uint32()),  # CRC-32 of the sample's ``size`` bytes at ``offset``: what the reader checks
])
_RECORD_META = b"vfm_shard_record"


@dataclass
class ShardRecord:
    """A written shard: its checksum, size, sample rows, and what its plan skipped."""

    name: str
    samples: int
    bytes: int
    sha256: str
    plan_digest: str
    rows: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)
    reencoded: int = 0
    version: str = ""  # Storage.version of the shard as written ("": a record from before they were kept)

    def summary(self) -> dict:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                "plan_digest": self.plan_digest, "skipped": self.skipped, "reencoded": self.reencoded,
                "version": self.version}


def record_uri(record_dir: str, name: str) -> str:
    return Storage.join(record_dir, f"{name}.parquet")


def save_record(record: ShardRecord, record_dir: str, storage: Storage) -> None:
    table = record.rows.replace_schema_metadata({_RECORD_META: json.dumps(record.summary()).encode()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(record_uri(record_dir, record.name), sink.getvalue())


def load_record(record_dir: str, name: str, storage: Storage) -> ShardRecord | None:
    """The record of shard ``name``, or None when there is none, it cannot be read, or an older
    vfm wrote it with other index columns (its shard is then rewritten)."""
    uri = record_uri(record_dir, name)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        summary = json.loads(table.schema.metadata[_RECORD_META])
    except (FileNotFoundError, KeyError, pa.ArrowInvalid, ValueError):
        return None
    if table.column_names != INDEX_SCHEMA.names:
        return None
    return ShardRecord(rows=table.replace_schema_metadata(None), **summary)


def index_table(records: list[ShardRecord]) -> pa.Table:
    """All sample rows, shard by shard in the order given."""
    if not records:
        return INDEX_SCHEMA.empty_table()
    return pa.concat_tables([r.rows.cast(INDEX_SCHEMA) for r in records])


def shard_list(records: list[ShardRecord], name: str) -> dict:
    """The shards.json document (wids-shard-index-v1 with bytes and sha256 per shard)."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [{"url": f"{SHARDS_FOLDER}/{r.name}", "nsamples": r.samples, "filesize": r.bytes,
                       "sha256": r.sha256} for r in records],
    }


def write_index(shard_dir: str, records: list[ShardRecord], name: str, storage: Storage) -> None:
    """Write index.parquet and shards.json under ``shard_dir`` (index first: the list points into it)."""
    sink = io.BytesIO()
    pq.write_table(index_table(records), sink)
    storage.write_bytes(Storage.join(shard_dir, INDEX_FILE), sink.getvalue())
    storage.write_json(Storage.join(shard_dir, SHARD_LIST_FILE), shard_list(records, name))


def read_shard_list(shard_dir: str, storage: Storage) -> list[dict]:
    """The shards.json entries, each with ``uri`` (absolute) added."""
    doc = storage.read_json(Storage.join(shard_dir, SHARD_LIST_FILE))
    return [{**entry, "uri": Storage.join(shard_dir, entry["url"])} for entry in doc["shardlist"]]


def read_index(shard_dir: str, storage: Storage) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(Storage.join(shard_dir, INDEX_FILE))))
