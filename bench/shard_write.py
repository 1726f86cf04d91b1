"""Shard writer throughput vs. plain tarfile writing the same samples to the same disk.

Both sides read every source image from disk and write the same samples (image + JSON
metadata) into tars of the same sizes in the same folder; the writer also checks each
source's sha256, hashes the tar, renames, and records the index. Prints one JSON object:
MB/s of each (median wall time of --repeats, interleaved: a run of about half a second
swings with the disk's writeback, and the median of each side is steadier than the one
luckiest run), writer/baseline (the issue asks >= 0.8), the same ratio on process CPU
time, and the ratio of the best runs.

    python bench/shard_write.py            # 3,000 photo crops, ~56 MB, under a minute
    python bench/shard_write.py --full     # 12,000 crops, ~330 MB
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_curation.builtin import load_builtin  # noqa: E402
from data_curation.shards.build import ShardSpec, build_shards  # noqa: E402
from data_curation.shards.plan import ShardLimits  # noqa: E402


def make_photo_pool(folder: Path, n: int, side: int = 256, seed: int = 0) -> Path:
    """``n`` distinct JPEG crops of scikit-image's sample photos and a manifest selecting them all."""
    rng = np.random.default_rng(seed)
    photos = [p if p.ndim == 3 else np.stack([p] * 3, axis=-1) for p in load_builtin("photos").images]
    photos = [p for p in photos if min(p.shape[:2]) >= side]
    rows = []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = (int(rng.integers(0, photo.shape[d] - side + 1)) for d in (0, 1))
        crop = np.ascontiguousarray(photo[y:y + side, x:x + side])
        crop[0, 0] = (i % 256, (i // 256) % 256, 0)  # no two crops alike
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, format="JPEG", quality=90)
        path = folder / "images" / f"{i:06d}.jpg"
        path.write_bytes(buf.getvalue())
        sha = hashlib.sha256(buf.getvalue()).hexdigest()
        rows.append({"id": sha, "uri": str(path), "sha256": sha, "width": side, "height": side,
                     "cluster_l1": i % len(photos), "selected": True, "selected_by": "balanced"})
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


def plain_tarfile(plan: list[dict], out: Path, prefix: str) -> int:
    """The baseline: the same samples written with tarfile, one archive per planned shard."""
    total = 0
    by_shard: dict[int, list[dict]] = {}
    for row in plan:
        by_shard.setdefault(row["shard"], []).append(row)
    for number, rows in sorted(by_shard.items()):
        with tarfile.open(out / f"{prefix}-{number:06d}.tar", "w") as tar:
            for row in rows:
                for name, data in ((f"{row['id']}.jpg", Path(row["uri"]).read_bytes()),
                                   (f"{row['id']}.json", json.dumps(row, default=str).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        total += (out / f"{prefix}-{number:06d}.tar").stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size run")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=9, help="runs of each side, interleaved")
    args = parser.parse_args()
    n = args.samples or (12_000 if args.full else 3_000)
    root = Path(tempfile.mkdtemp(prefix="bench-shard-write-"))
    try:
        manifest = make_photo_pool(root / "pool", n)
        spec = ShardSpec(prefix="b", limits=ShardLimits(samples=250, max_bytes=64 << 20, seed=0), shards_per_task=4)
        wall = {"writer": [], "baseline": []}
        cpu = {"writer": [], "baseline": []}
        shard_bytes, baseline_bytes = 0, 0
        for rep in range(args.repeats):  # interleaved, so that a change of machine load hits both alike
            out = root / f"writer-{rep}"
            t0, c0 = time.perf_counter(), time.process_time()
            result = build_shards(str(manifest), str(out / "shard"), str(out / "work"), spec, log=lambda _: None)
            wall["writer"].append(time.perf_counter() - t0)
            cpu["writer"].append(time.process_time() - c0)
            shard_bytes = sum(r.bytes for r in result.records)
            plan = pq.read_table(out / "work" / "plan.parquet").drop_columns(["clusters"]).to_pylist()

            base = root / f"baseline-{rep}"
            base.mkdir()
            t0, c0 = time.perf_counter(), time.process_time()
            baseline_bytes = plain_tarfile(plan, base, "b")
            wall["baseline"].append(time.perf_counter() - t0)
            cpu["baseline"].append(time.process_time() - c0)
            shutil.rmtree(out)
            shutil.rmtree(base)
        def rate(nbytes: int, seconds: list[float], pick=np.median) -> float:
            return nbytes / 1e6 / float(pick(seconds))

        writer_mb_s, baseline_mb_s = rate(shard_bytes, wall["writer"]), rate(baseline_bytes, wall["baseline"])
        print(json.dumps({
            "bench": "shard_write", "samples": n, "shards": len(result.records), "shard_mb": round(shard_bytes / 1e6, 2),
            "repeats": args.repeats,
            "writer_mb_s": round(writer_mb_s, 1), "baseline_tarfile_mb_s": round(baseline_mb_s, 1),
            "ratio": round(writer_mb_s / baseline_mb_s, 3), "target_ratio": 0.8,
            "ratio_cpu_time": round(rate(shard_bytes, cpu["writer"]) / rate(baseline_bytes, cpu["baseline"]), 3),
            "ratio_best_runs": round(rate(shard_bytes, wall["writer"], min) / rate(baseline_bytes, wall["baseline"], min),
                                     3),
            "writer_s": [round(t, 3) for t in wall["writer"]], "baseline_s": [round(t, 3) for t in wall["baseline"]],
            "baseline": "tarfile.addfile of the same source bytes + JSON into tars of the same plan, same disk",
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
