"""RAM of dedup and retrieval over memory-mapped embedding chunks, against loading them whole.

The curate stage's near-duplicate search (data_curation.dedup) and retrieval picks
(data_curation.retrieval) read the pool's vectors from its embedding chunks (.npy files,
memory-mapped, as curate/_work/embeddings holds them). Each measurement runs in its own
subprocess and reports the peak of its anonymous RSS (sampled from /proc every 2 ms)
above what it held before the step; mapped file pages are the page cache's, not counted.

- ``chunked``: the library as the stage calls it, on a RowSet over the mapped chunks
- ``loaded`` (baseline, same run): the chunks concatenated into one array first (the
  selected rows for retrieval), then the same call
- ``index``: what faiss itself needs: an index over the same vectors and the same search
  (dedup: every vector, a block of queries at a time, whose BLAS buffers and per-thread
  heaps are a few tens of MB whatever the pool's size; retrieval: the seeds)

Figure: the RAM each way holds beyond faiss's, in MB and in copies of the vectors ((peak -
index peak) / vectors' bytes). Target (issue 4: nothing needs all the embeddings in RAM at
once beyond what faiss itself needs): the chunked way holds less than the loaded one at
every shape, and at most 0.25 of a copy at the large (IVF) shape: what it holds beyond
faiss is a block of queries, the edges and per-row bookkeeping, not the vectors (at the
small flat shape that is still a large share of a 40 MB pool). The two ways' results must
agree.
Data: unit vectors from 2,000 Gaussians with planted near duplicates (2%), in chunks of
25,000 rows. The flat shape stays under knn.FLAT_MAX (exact search), the IVF one over it.

    python bench/knn_memory.py              # 40k x 256 (flat) and 300k x 128 (IVF), ~6 min on 2 cores
    python bench/knn_memory.py --only flat
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"flat": (40_000, 256), "ivf": (300_000, 128)}
TARGET = 0.25  # copies of the vectors the chunked way may hold beyond faiss's, at the IVF shape
CHUNK_ROWS = 25_000
SEEDS = 1_000
THRESHOLD = 0.99


def anon_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakWatch:
    """The peak anonymous RSS above the level at start, sampled on a thread."""

    def __enter__(self) -> PeakWatch:
        self.start = anon_rss_mb()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss_mb())

    @property
    def above_start_mb(self) -> float:
        return self.peak - self.start


def write_chunks(folder: Path, n: int, d: int, seed: int = 0) -> None:
    """Chunk .npy files of unit vectors; 2% of rows are near copies of earlier rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, d)).astype(np.float32)
    for index, start in enumerate(range(0, n, CHUNK_ROWS)):
        rows = min(CHUNK_ROWS, n - start)
        x = centres[rng.integers(2000, size=rows)] + 0.5 * rng.standard_normal((rows, d), dtype=np.float32)
        copies = rng.random(rows) < 0.02
        x[copies] = x[np.flatnonzero(~copies)[:copies.sum()]] + 0.003 * rng.standard_normal(
            (int(copies.sum()), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / f"chunk-{index:06d}.embedding.npy", x)


def run_one(mode: str, step: str, folder: Path) -> dict:
    from data_curation.dedup import deduplicate
    from data_curation.knn import RowSet, build_ip_index
    from data_curation.retrieval import retrieval_picks

    parts = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("chunk-*.embedding.npy"))]
    n = sum(len(p) for p in parts)
    sha = np.array([f"{i:x}" for i in range(n)], dtype=object)
    kept = np.flatnonzero(np.random.default_rng(1).random(n) < 0.9)  # rows left after dedup
    seeds = np.ascontiguousarray(parts[0][:SEEDS])
    start = time.perf_counter()
    with PeakWatch() as watch:
        if mode == "index":  # faiss's part: the index and the working memory of its searches
            index = build_ip_index(RowSet(parts) if step == "dedup" else RowSet(parts).subset(kept))
            for block in RowSet(parts).blocks() if step == "dedup" else [seeds]:
                index.index.search(block, 17)  # faiss's search alone, without the exact re-ranking
            result = {"ntotal": int(index.ntotal)}
        elif step == "dedup":
            vectors = np.concatenate(parts) if mode == "loaded" else RowSet(parts)
            dedup = deduplicate(sha, vectors, THRESHOLD)
            result = {"removed": int((~dedup.kept).sum()), "groups_digest": int(np.sum(dedup.group * 31 % 1_000_003))}
        else:
            pool = np.concatenate(parts)[kept] if mode == "loaded" else RowSet(parts).subset(kept)
            picks = retrieval_picks(pool, seeds, 16)
            result = {"picked": len(picks), "picks_digest": int(np.sum(picks % 1_000_003))}
    return {"mode": mode, "step": step, "seconds": round(time.perf_counter() - start, 2),
            "peak_anon_mb": round(watch.above_start_mb, 1), "result": result}


def measure(mode: str, step: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", mode, step, str(folder)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(SHAPES), help="one of the two shapes")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "STEP", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], Path(args.one[2]))))
        return
    results, ok = [], True
    for name, (n, d) in SHAPES.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory(prefix="vfm-knn-memory-") as tmp:
            write_chunks(Path(tmp), n, d)
            for step in ("dedup", "retrieval"):
                runs = {mode: measure(mode, step, Path(tmp)) for mode in ("index", "loaded", "chunked")}
                agree = runs["chunked"]["result"] == runs["loaded"]["result"]
                vectors_mb = runs["index"]["result"]["ntotal"] * d * 4 / 2**20

                copies = {mode: round((runs[mode]["peak_anon_mb"] - runs["index"]["peak_anon_mb"]) / vectors_mb, 3)
                          for mode in ("chunked", "loaded")}
                ok &= agree and copies["chunked"] < copies["loaded"] and (name != "ivf" or copies["chunked"] <= TARGET)
                results.append({"shape": f"{n}x{d}", "index_kind": name, "step": step,
                                "vectors_mb": round(vectors_mb, 1), **runs,
                                **{f"mb_beyond_index_{mode}": round(runs[mode]["peak_anon_mb"]
                                                                    - runs["index"]["peak_anon_mb"], 1)
                                   for mode in ("chunked", "loaded")},
                                "copies_beyond_index_chunked": copies["chunked"],
                                "copies_beyond_index_loaded": copies["loaded"],
                                "ratio_chunked_over_loaded_seconds": round(runs["chunked"]["seconds"]
                                                                           / max(runs["loaded"]["seconds"], 1e-9), 3),
                                "results_agree": agree})
    print(json.dumps({"bench": "knn_memory", "chunk_rows": CHUNK_ROWS, "results": results,
                      "target": f"copies_beyond_index_chunked < loaded everywhere and <= {TARGET} at the ivf shape, "
                                "results agree", "pass": ok}, indent=2))


if __name__ == "__main__":
    main()
