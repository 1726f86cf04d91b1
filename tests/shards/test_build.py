"""Manifest -> shards: contents, limits, reproducibility, resumability, bad sources."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_curation.shards.build import ShardSpec, build_shards
from data_curation.shards.encode import EncodeOptions
from data_curation.shards.index import read_index, read_shard_list
from data_curation.shards.plan import ShardLimits, read_selected
from data_curation.shards.verify import verify_shards
from data_curation.storage import Storage
from tests.shards.conftest import SPEC
from tests.shards.image_pool import make_pool

QUIET = {"log": lambda _: None}
REPO = Path(__file__).resolve().parents[2]


def _tar_samples(shard_dir: str) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over all shards, read with the standard tarfile module."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in read_shard_list(shard_dir, Storage()):
        with tarfile.open(entry["uri"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".")
                assert member.mtime == 0 and member.uid == 0 and member.isfile()
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_every_selected_image_once_with_metadata(built_once):
    pool = built_once.pool
    samples = _tar_samples(built_once.shard_dir)
    assert set(samples) == pool.selected
    reencoded = 0
    for key, members in samples.items():
        meta = json.loads(members.pop("json"))
        (ext, image), = members.items()
        assert meta["id"] == key and meta["uri"] == pool.uris[key]
        assert meta["cluster_ids"]["l1"] == pool.labels[key] and meta["cluster_ids"]["l2"] == pool.labels[key] // 5
        assert meta["selected_by"] in ("balanced", "retrieval") and (meta["width"], meta["height"]) == (24, 24)
        if pool.uris[key].endswith(".bmp"):  # not a kept format: re-encoded as JPEG
            reencoded += 1
            assert ext == "jpg" and Image.open(io.BytesIO(image)).size == (24, 24)
        else:
            assert image == pool.source[key]
    assert reencoded == sum(u.endswith(".bmp") for u in pool.uris.values()) > 0
    stats = json.loads(Path(built_once.shard_dir, "stats.json").read_text())
    assert stats["samples"] == len(pool.selected) and stats["reencoded"] == reencoded


def test_index_offsets_point_at_the_members(built_once):
    index = read_index(built_once.shard_dir, Storage()).to_pylist()
    shards = {e["url"].split("/")[-1]: Path(e["uri"]).read_bytes() for e in read_shard_list(built_once.shard_dir,
                                                                                           Storage())}
    for row in index:
        data = shards[row["shard"]]
        image = data[row["image_offset"]:row["image_offset"] + row["image_size"]]
        assert hashlib.sha256(image).hexdigest() == row["sha256"]
        meta = json.loads(data[row["json_offset"]:row["json_offset"] + row["json_size"]])
        assert meta["id"] == row["key"]
    listed = read_shard_list(built_once.shard_dir, Storage())
    assert [e["nsamples"] for e in listed] == list(Counter(r["shard"] for r in index).values())
    assert all(hashlib.sha256(shards[e["url"].split("/")[-1]]).hexdigest() == e["sha256"] for e in listed)


def test_shards_respect_limits_and_spread_clusters(built_once, tmp_path):
    pool = built_once.pool
    index = read_index(built_once.shard_dir, Storage()).to_pylist()
    per_shard: dict[str, Counter] = {}
    for row in index:
        per_shard.setdefault(row["shard"], Counter())[pool.labels[row["key"]]] += 1
    assert max(sum(c.values()) for c in per_shard.values()) == 30
    overall = Counter(pool.labels.values())
    for counts in list(per_shard.values())[:-1]:  # full shards: each digit close to its share
        for label, n in overall.items():
            assert abs(counts[label] - 30 * n / len(pool.labels)) <= 1.5, (label, counts)
    capped = ShardSpec(prefix="t", limits=ShardLimits(samples=30, max_bytes=24_000, seed=3))
    build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), capped, **QUIET)
    plan = pq.read_table(tmp_path / "work" / "plan.parquet").to_pylist()
    planned = Counter()
    for row in plan:
        planned[row["shard"]] += row["source_bytes"] + 2048
    assert len(planned) > len(per_shard) and max(planned.values()) <= 24_000


def test_rebuild_gives_identical_bytes(built_once, tmp_path):
    build_shards(built_once.pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), SPEC, **QUIET)
    first = read_shard_list(built_once.shard_dir, Storage())
    again = read_shard_list(str(tmp_path / "shard"), Storage())
    assert [(e["url"], e["sha256"]) for e in first] == [(e["url"], e["sha256"]) for e in again]


def test_rerun_rewrites_only_missing_and_mismatching_shards(built):
    shards = sorted(Path(built.shard_dir, "shards").iterdir())
    shards[1].unlink()
    data = bytearray(shards[3].read_bytes())
    data[700] ^= 0x01
    shards[3].write_bytes(bytes(data))
    lines: list[str] = []
    result = build_shards(built.pool.manifest_uri, built.shard_dir, built.work_dir, SPEC, log=lines.append)
    assert (result.kept, result.written, result.missing, result.mismatching) == (len(shards) - 2, 2, 1, 1)
    assert any(f"{len(shards) - 2} kept, 2 rewritten" in line for line in lines)
    assert verify_shards(built.shard_dir).ok


class _OpenLog(Storage):
    """A Storage that notes every file it opens for reading."""

    def __init__(self):
        super().__init__()
        self.opened: list[str] = []

    def open(self, uri: str, mode: str = "rb"):
        self.opened.append(Path(uri).name)
        return super().open(uri, mode)


def _record_meta(work_dir: str, name: str) -> tuple[pa.Table, dict]:
    path = Path(work_dir, "records", f"{name}.parquet")
    table = pq.read_table(path)
    return table, json.loads(table.schema.metadata[b"vfm_shard_record"])


def test_a_rerun_keeps_recorded_shards_without_reading_them(built):
    shards = sorted(Path(built.shard_dir, "shards").iterdir())
    storage = _OpenLog()
    result = build_shards(built.pool.manifest_uri, built.shard_dir, built.work_dir, SPEC, storage, **QUIET)
    assert (result.kept, result.written) == (len(shards), 0)
    assert not [name for name in storage.opened if name.endswith(".tar")]

    # Touched since its record (a copy of the run dir without its times): read through once,
    # kept for its unchanged sha256, and recorded at its new version.
    os.utime(shards[2], ns=(time.time_ns(), time.time_ns()))
    # A record from before versions were kept: the same.
    table, meta = _record_meta(built.work_dir, shards[4].name)
    del meta["version"]
    pq.write_table(table.replace_schema_metadata({b"vfm_shard_record": json.dumps(meta).encode()}),
                   Path(built.work_dir, "records", f"{shards[4].name}.parquet"))
    for expected_reads in ([shards[2].name, shards[4].name], []):
        storage = _OpenLog()
        result = build_shards(built.pool.manifest_uri, built.shard_dir, built.work_dir, SPEC, storage, **QUIET)
        assert (result.kept, result.written) == (len(shards), 0)
        assert sorted(name for name in storage.opened if name.endswith(".tar")) == expected_reads
    assert _record_meta(built.work_dir, shards[4].name)[1]["version"] == Storage().version(str(shards[4]))


_KILLABLE_WRITER = """
import sys, time
from data_curation.shards.build import build_shards
from data_curation.storage import Storage
from tests.shards.conftest import SPEC

class SlowStorage(Storage):
    def read_bytes(self, uri):
        time.sleep(0.02)
        return super().read_bytes(uri)

build_shards(sys.argv[1], sys.argv[2], sys.argv[3], SPEC, SlowStorage(), log=lambda _: None)
"""


def test_kill_during_writing_then_rerun_keeps_finished_shards(pool, tmp_path):
    shard_dir, work_dir = tmp_path / "shard", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE_WRITER, pool.manifest_uri, str(shard_dir),
                             str(work_dir)], cwd=REPO)
    records = work_dir / "records"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(records.glob("*.parquet")) if records.is_dir() else []) < 2:
        assert proc.poll() is None, "the writer finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = len(list(records.glob("*.parquet")))
    for path in (shard_dir / "shards").glob("t-*.tar"):  # whatever has a final name is a whole archive
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) % 2 == 0
    lines: list[str] = []
    result = build_shards(pool.manifest_uri, str(shard_dir), str(work_dir), SPEC, log=lines.append)
    assert 2 <= result.kept == recorded < len(result.records)
    assert result.written == len(result.records) - recorded
    assert any(f"{recorded} kept, {result.written} rewritten" in line for line in lines)
    assert not [p for p in (shard_dir / "shards").iterdir() if p.name.startswith(".")]
    assert set(_tar_samples(str(shard_dir))) == pool.selected
    assert verify_shards(str(shard_dir)).ok


def test_a_manifest_with_file_sizes_plans_without_looking_the_sources_up(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=30, current=True)
    gone = sorted(pool.selected)[0]
    Path(pool.uris[gone]).unlink()
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=20, max_bytes=1 << 20, seed=0))
    result = build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), spec, **QUIET)
    assert result.skipped["vanished_before_planning"] == 0 and result.skipped["missing"] == 1  # found by the writer
    plan = pq.read_table(tmp_path / "work" / "plan.parquet").to_pylist()
    assert len(plan) == len(pool.selected) and all(row["source_bytes"] == row["bytes"] for row in plan)
    assert set(_tar_samples(str(tmp_path / "shard"))) == pool.selected - {gone}


def test_vanished_and_changed_sources_are_skipped_and_counted(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=60)
    keys = sorted(pool.selected)
    Path(pool.uris[keys[0]]).unlink()  # gone before the plan is made
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=20, max_bytes=1 << 20, seed=0))
    shard_dir, work_dir = str(tmp_path / "shard"), str(tmp_path / "work")
    first = build_shards(pool.manifest_uri, shard_dir, work_dir, spec, **QUIET)
    assert first.skipped["vanished_before_planning"] == 1 and first.samples == len(keys) - 1

    Path(pool.uris[keys[1]]).unlink()  # gone after planning
    Path(pool.uris[keys[2]]).write_bytes(pool.source[keys[3]])  # changed since curation
    for shard in Path(shard_dir, "shards").iterdir():
        shard.unlink()
    lines: list[str] = []
    again = build_shards(pool.manifest_uri, shard_dir, work_dir, spec, log=lines.append)
    assert (again.skipped["missing"], again.skipped["changed"], again.skipped["vanished_before_planning"]) == (1, 1, 1)
    assert again.samples == len(keys) - 3
    assert any("changed 1" in line and "missing 1" in line for line in lines)
    stats = json.loads(Path(shard_dir, "stats.json").read_text())
    assert stats["skipped"] == {"vanished_before_planning": 1, "missing": 1, "changed": 1}
    assert set(_tar_samples(shard_dir)) == pool.selected - set(keys[:3])
    assert verify_shards(shard_dir).ok


def test_max_side_downscales_and_reencodes(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=20)
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=50, max_bytes=1 << 20, seed=0),
                     encode=EncodeOptions(max_side=16, format="png"))
    build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), spec, **QUIET)
    samples = _tar_samples(str(tmp_path / "shard"))
    assert len(samples) == len(pool.selected)
    for members in samples.values():
        assert Image.open(io.BytesIO(members["png"])).size == (16, 16)
        assert (json.loads(members["json"])["width"], json.loads(members["json"])["height"]) == (16, 16)


def test_sources_inside_a_tar_are_read_and_sized_from_it(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=40, packed=True)
    assert all(uri.startswith("tar://") for uri in pool.uris.values())
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=50, max_bytes=1 << 20, seed=0))
    build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), spec, **QUIET)
    plan = pq.read_table(tmp_path / "work" / "plan.parquet").to_pylist()
    assert all(row["source_bytes"] == len(pool.source[row["id"]]) for row in plan)
    samples = _tar_samples(str(tmp_path / "shard"))
    assert set(samples) == pool.selected
    for key, members in samples.items():  # BMP sources are re-encoded, the others stored as they are
        assert pool.source[key] in members.values() or pool.source[key].startswith(b"BM")


def test_tar_sources_with_spans_in_the_manifest_are_read_alone(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=40, packed=True, current=True)
    manifest = pq.read_table(pool.manifest_uri).to_pylist()
    first = min((row for row in manifest if row["selected"]), key=lambda row: row["span_start"])
    shard_data = bytearray((tmp_path / "src" / "images.tar").read_bytes())
    at = first["span_start"] + 148  # the first selected member's header checksum: a pass over the tar stops there
    shard_data[at:at + 8] = b"garbage!"
    (tmp_path / "src" / "images.tar").write_bytes(bytes(shard_data))
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=50, max_bytes=1 << 20, seed=0))
    result = build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), spec, **QUIET)
    assert set(_tar_samples(str(tmp_path / "shard"))) == pool.selected - {first["id"]}
    assert result.skipped["unreadable"] == 1
    plan = pq.read_table(tmp_path / "work" / "plan.parquet").to_pylist()  # sized by the manifest: a header
    assert all(row["source_bytes"] == len(pool.source[row["id"]]) for row in plan)  # scan fails on this tar


def test_a_repeated_id_in_the_manifest_is_written_once_and_counted(tmp_path):
    pool = make_pool(str(tmp_path / "src"), n=20)
    manifest = pq.read_table(pool.manifest_uri)
    repeat = manifest.filter(manifest["selected"]).slice(0, 1)
    pq.write_table(pa.concat_tables([manifest, repeat]), pool.manifest_uri)
    spec = ShardSpec(prefix="t", limits=ShardLimits(samples=50, max_bytes=1 << 20, seed=0))
    result = build_shards(pool.manifest_uri, str(tmp_path / "shard"), str(tmp_path / "work"), spec, **QUIET)
    assert result.skipped["repeated_id"] == 1 and result.samples == len(pool.selected)
    assert set(_tar_samples(str(tmp_path / "shard"))) == pool.selected


def test_a_manifest_in_many_row_groups_reads_as_in_one(tmp_path):
    """curate writes its manifest a row group at a time; the plan reads one at a time."""
    pool = make_pool(str(tmp_path / "src"), n=40, current=True)
    whole = Storage().read_bytes(pool.manifest_uri)
    buf = io.BytesIO()
    pq.write_table(pq.read_table(io.BytesIO(whole)), buf, row_group_size=7)
    assert pq.ParquetFile(io.BytesIO(buf.getvalue())).num_row_groups == 6
    one, repeated_one = read_selected(whole, pool.manifest_uri)
    many, repeated_many = read_selected(buf.getvalue(), "many")
    assert one.equals(many) and repeated_one == repeated_many == 0
    assert set(many["id"].to_pylist()) == pool.selected
