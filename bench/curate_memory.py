"""What the curate stage's driver holds per image once the pool is embedded.

After listing and embedding (Ray tasks and actors), the rest of the curate stage runs in the
driver over the embedding chunks: exact and near dedup, the hierarchical k-means fit (level-1
assignment on Ray), sampling, the manifest. Its vectors are memory-mapped; what grows with the
pool is what it keeps per image. This bench builds an embedded pool of N images (a listing of
N empty ``.jpg`` files and embedding chunks of clustered random vectors with planted exact
and near duplicates, as the stage writes them), runs the real stage on it (real local Ray; the
chunks are all done, so nothing is decoded) in a subprocess, and samples that process's
anonymous RSS every 2 ms from the stage's start.

The stage runs on two pools, N/4 and N images, and every figure is what one more image adds
(the difference of the two runs over the difference of their sizes), so that what the stage
holds whatever the pool's size (imports, Ray Data, allocator pools, a manifest row group) drops
out: ``driver_bytes_per_image`` (the peak above the RSS when the stage started) and
``beyond_faiss_bytes_per_image``, that less what faiss itself needs (``dedup_index_bytes_per_image``:
the peak of building the near-dedup index over the same copy descriptors and searching it with
each of them, in a process of its own: the largest faiss structure of the stage); beside them,
in the same run, the baseline ``metadata_bytes_per_image``: the chunks' per-image metadata
(uri, id, sha256, size, decode result) as one Arrow table, what a driver that gathers it in RAM
holds before anything else.

    python bench/curate_memory.py                 # 100k and 400k images, ~4 min on 2 cores
    python bench/curate_memory.py --images 200000
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from bench.knn_memory import PeakWatch  # noqa: E402

CHUNK_ROWS = 25_000
EMBED_DIM = 64
COPY_DIM = 64
FILES_PER_FOLDER = 1_000
EXACT_SHARE, NEAR_SHARE, REJECT_SHARE = 0.02, 0.02, 0.01


def make_pool(root: Path, n: int) -> Path:
    """N empty .jpg files in folders of 1,000 (listed by extension, never read here)."""
    pool = root / "pool"
    for start in range(0, n, FILES_PER_FOLDER):
        folder = pool / f"{start // FILES_PER_FOLDER:05d}"
        folder.mkdir(parents=True)
        for i in range(start, min(n, start + FILES_PER_FOLDER)):
            (folder / f"image-{i:09d}.jpg").touch()
    return pool


def embed_pool(config, run_dir: Path) -> dict:
    """The stage's own listing of the pool, then one finished embedding chunk per listing chunk:
    clustered unit vectors; a share of rows are exact copies (same sha256) or near copies (copy
    descriptor + noise) of earlier rows, and a share are rejected (truncated)."""
    import pyarrow.parquet as pq

    from data_curation.embedding_store import ChunkStore
    from data_curation.listing import Listing
    from data_curation.storage import Storage

    cfg, storage = config.curate, Storage()
    work = run_dir / "curate" / "_work"
    rows_per_chunk, _ = Listing(cfg.sources, str(work / "listing"), storage, cfg.embed.chunk_size, cfg.sniff,
                                cfg.uri_column).write()
    store = ChunkStore(str(work / "embeddings"), storage)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(500, EMBED_DIM)).astype(np.float32)
    earlier_sha: list[str] = []
    for index in sorted(rows_per_chunk):
        listing = pq.read_table(work / "listing" / f"chunk-{index:06d}.parquet")
        n = listing.num_rows
        sha = np.array([hashlib.sha256(f"{index}-{i}".encode()).hexdigest() for i in range(n)], dtype=object)
        exact = rng.random(n) < EXACT_SHARE
        if earlier_sha:
            sha[exact] = rng.choice(earlier_sha, size=int(exact.sum()))
        earlier_sha.extend(sha[~exact][:2000].tolist())
        embedding = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, EMBED_DIM),
                                                                                          dtype=np.float32)
        copy = rng.standard_normal((n, COPY_DIM), dtype=np.float32)
        near = np.flatnonzero(rng.random(n) < NEAR_SHARE)
        copy[near] = copy[near // 2] + 0.01 * rng.standard_normal((len(near), COPY_DIM), dtype=np.float32)
        for x in (embedding, copy):
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        rejected = rng.random(n) < REJECT_SHARE
        store.write(index, {
            "uri": np.asarray(listing.column("uri").to_pylist(), dtype=object),
            "id": np.where(rejected, "", sha), "sha256": np.where(rejected, "", sha),
            "width": np.where(rejected, -1, 96), "height": np.where(rejected, -1, 64),
            "reject_reason": np.where(rejected, "truncated", ""), "accepted": ~rejected,
            "embedding": embedding, "copy": copy,
            "span_start": np.full(n, -1), "span_end": np.full(n, -1), "bytes": np.full(n, 12_345),
        })
    return rows_per_chunk


def stage_config(pool: Path, cache: Path):
    from pipeline.config.root import load_config

    return load_config("local", [f"curate.sources=['{pool}']", f"curate.embed.chunk_size={CHUNK_ROWS}",
                                 f"run.cache_dir={cache}", "curate.sample.target=0.2"])


def run_stage(pool: Path, run_dir: Path, cache: Path) -> dict:
    """In this (fresh) process: the curate stage on the embedded pool, peak RSS from its start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_curation.storage import Storage
    from orchestration.ray_runtime import start_ray, stop_ray
    from orchestration.stage import StageContext
    from pipeline.stages.curate import CurateStage

    config = stage_config(pool, cache)
    started = start_ray(None, num_cpus=2, num_gpus=0, dashboard=False, object_store_memory_gb=None,
                        cache_dir=cache)
    tracker = SimpleNamespace(log_metrics=lambda *a, **k: None, log_artifact=lambda *a, **k: None,
                              set_tags=lambda *a, **k: None)
    ctx = StageContext(name="curate", config=config, section=config.curate, run_dir=str(run_dir),
                       dir=str(run_dir / "curate"), work_dir=str(run_dir / "curate" / "_work"),
                       cache_dir=cache / "stage", storage=Storage(), tracker=tracker)
    try:
        t0 = time.perf_counter()
        with PeakWatch() as watch:
            metrics = CurateStage().run(ctx)
        seconds = time.perf_counter() - t0
    finally:
        stop_ray(started)
    chunks = sorted((run_dir / "curate" / "_work" / "embeddings").glob("chunk-*.parquet"))
    metadata_bytes = pa.concat_tables([pq.read_table(p) for p in chunks]).nbytes
    return {"seconds": round(seconds, 1), "driver_peak_mb": round(watch.above_start_mb, 1),
            "metadata_mb": round(metadata_bytes / 2**20, 1),
            "inputs": int(metrics["inputs"]), "kept_after_dedup": int(metrics["kept_after_dedup"]),
            "duplicates_exact": int(metrics["duplicates_exact"]), "duplicates_near": int(metrics["duplicates_near"]),
            "selected": int(metrics["selected"])}


def build_index(run_dir: Path) -> dict:
    """In this (fresh) process: what faiss itself needs for near dedup, the peak RSS of building
    the index over the copy descriptors of the accepted images (as the stage's dedup does; a
    few percent more rows than its distinct ones) and searching it with every one of them."""
    from data_curation.embedding_store import ChunkStore, chunk_indices
    from data_curation.knn import RowSet, build_ip_index
    from data_curation.storage import Storage

    root = str(run_dir / "curate" / "_work" / "embeddings")
    store = ChunkStore(root, Storage())
    vectors = RowSet([store.read(i).copy for i in sorted(chunk_indices(root, Storage()))])
    with PeakWatch() as watch:
        index = build_ip_index(vectors)
        for block in vectors.blocks():
            index.index.search(block, 17)  # faiss's search alone, without the exact re-ranking
    return {"index_peak_mb": round(watch.above_start_mb, 1), "index_rows": int(index.ntotal)}


def measure(n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="vfm-curate-memory-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pool = make_pool(root, n)
        embed_pool(stage_config(pool, root / "cache"), root / "run")
        setup_s = time.perf_counter() - t0
        stage = run_self("--stage", str(pool), str(root / "run"), str(root / "cache"))
        index = run_self("--index", str(root / "run"))
    return {"setup_seconds": round(setup_s, 1), **stage, **index}


def run_self(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400_000, help="the larger pool; the smaller is a quarter")
    parser.add_argument("--stage", nargs=3, metavar=("POOL", "RUN_DIR", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--index", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage or args.index:
        print(json.dumps(run_stage(*(Path(p) for p in args.stage)) if args.stage else build_index(Path(args.index))))
        return
    small, large = measure(args.images // 4), measure(args.images)
    added = large["inputs"] - small["inputs"]

    def per_image(key: str) -> int:  # what one more image adds, in bytes
        return round((large[key] - small[key]) * 2**20 / added)

    driver, index, metadata = per_image("driver_peak_mb"), per_image("index_peak_mb"), per_image("metadata_mb")
    print(json.dumps({"bench": "curate_memory", "chunk_rows": CHUNK_ROWS, "embed_dim": EMBED_DIM, "copy_dim": COPY_DIM,
                      "small": small, "large": large, "driver_bytes_per_image": driver,
                      "dedup_index_bytes_per_image": index, "beyond_faiss_bytes_per_image": driver - index,
                      "metadata_bytes_per_image": metadata,
                      "beyond_faiss_over_metadata": round((driver - index) / metadata, 3)}, indent=2))


if __name__ == "__main__":
    main()
