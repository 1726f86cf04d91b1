"""Shard reader throughput vs. a bare PIL decode loop, and the time to resume at sample N.

Shards of 256x256 JPEG photo crops are written, then:
- baseline: a bare loop that decodes the same image bytes (already in memory) to RGB;
- reader: ShardDataset decoding to RGB, in the main process (1 worker) and through a torch
  DataLoader with 2 persistent worker processes (batches are counted inside the workers, so
  only the count crosses processes; the first pass, which starts the workers, is reported
  apart);
- overhead: the reader with decoding off (read, check names and sha256, parse the JSON), per
  sample, beside the decode time per sample; this and the 1-worker ratio on process CPU time
  hold up better than wall-clock ratios when other jobs share the machine;
- resume: time from a resume at position N to its first sample, for N across the epoch
  (it should stay flat: an index lookup and one block read, nothing decoded before N).
Prints one JSON object; the issue asks reader/baseline >= 0.9.

    python bench/shard_read.py            # 2,000 crops, about a minute
    python bench/shard_read.py --full     # 10,000 crops
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shard_write import make_photo_pool  # noqa: E402

from data_curation.shards.build import ShardSpec, build_shards  # noqa: E402
from data_curation.shards.plan import ShardLimits  # noqa: E402
from data_curation.shards.reader import ShardDataset  # noqa: E402


def _timed(fn, count: int, clock=time.perf_counter) -> float:
    t0 = clock()
    done = fn()
    elapsed = clock() - t0
    assert done == count, (done, count)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full-size run")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.samples or (10_000 if args.full else 2_000)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-shard-read-"))
    try:
        manifest = make_photo_pool(root / "pool", n)
        shard_dir = str(root / "shard")
        spec = ShardSpec(prefix="b", limits=ShardLimits(samples=200, max_bytes=64 << 20, seed=0))
        build_shards(str(manifest), shard_dir, str(root / "work"), spec, log=lambda _: None)
        images = [p.read_bytes() for p in sorted((root / "pool" / "images").iterdir())]

        def bare_pil() -> int:
            for data in images:
                with Image.open(io.BytesIO(data)) as image:
                    image.convert("RGB")
            return len(images)

        dataset = ShardDataset(shard_dir, shuffle_block=256)
        # Persistent workers, started by a first pass that is timed apart: the rate is the steady state.
        loader = DataLoader(dataset, batch_size=32, num_workers=2, collate_fn=len, persistent_workers=True)
        first_pass_s = _timed(lambda: sum(loader), n)
        undecoded = ShardDataset(shard_dir, shuffle_block=256, decode=False)
        runs = {"baseline": [], "one": [], "two": [], "raw": [], "baseline_cpu": [], "one_cpu": []}
        for _ in range(args.repeats):  # interleaved, so that a change of machine load hits all alike
            runs["baseline"].append(_timed(bare_pil, n))
            runs["one"].append(_timed(lambda: sum(1 for _ in dataset), n))
            runs["two"].append(_timed(lambda: sum(loader), n))
            runs["raw"].append(_timed(lambda: sum(1 for _ in undecoded), n))
            runs["baseline_cpu"].append(_timed(bare_pil, n, time.process_time))
            runs["one_cpu"].append(_timed(lambda: sum(1 for _ in dataset), n, time.process_time))
        baseline, one, two = (n / min(runs[k]) for k in ("baseline", "one", "two"))

        t0 = time.perf_counter()
        ShardDataset(shard_dir)
        index_load_s = time.perf_counter() - t0
        resume = {}
        for start in (0, n // 4, n // 2, 3 * n // 4, n - 1):
            best = float("inf")
            for _ in range(args.repeats):
                dataset.set_epoch(0, start)
                t0 = time.perf_counter()
                next(iter(dataset))
                best = min(best, time.perf_counter() - t0)
            resume[str(start)] = round(best * 1e3, 2)
        print(json.dumps({
            "bench": "shard_read", "samples": n, "image": "256x256 JPEG q90",
            "baseline_pil_samples_s": round(baseline, 1),
            "reader_1_worker_samples_s": round(one, 1), "ratio_1_worker": round(one / baseline, 3),
            "reader_2_workers_samples_s": round(two, 1), "ratio_2_workers": round(two / baseline, 3),
            "reader_2_workers_first_pass_s": round(first_pass_s, 3),
            "target_ratio": 0.9,
            "ratio_1_worker_cpu_time": round(min(runs["baseline_cpu"]) / min(runs["one_cpu"]), 3),
            "reader_overhead_us_per_sample": round(min(runs["raw"]) / n * 1e6, 1),
            "pil_decode_us_per_sample": round(1e6 / baseline, 1),
            "index_load_ms": round(index_load_s * 1e3, 1),
            "resume_first_sample_ms_by_position": resume,
            "resume_max_over_min": round(max(resume.values()) / min(resume.values()), 2),
            "baseline": "Image.open(bytes).convert('RGB') over the same image bytes, held in memory",
        }))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
