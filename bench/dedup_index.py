"""The near-dedup index of a large pool: 8-bit codes with exact re-ranking against float32 lists.

Above knn.FLAT_MAX vectors, near dedup (data_curation.dedup.deduplicate) searches an IVF
index. It stores each vector as one byte per dimension and computes again, from the
memory-mapped chunks, every similarity its codes leave in doubt around the threshold. The
baseline, in the same run, is the same ``deduplicate`` over an IVF index that stores the
float32 vectors (faiss.IndexIVFFlat: same lists, same training sample, same probes), what
the library built before; its lists are filled by plain ``add``.

Each way runs in its own subprocess over the same chunk files (.npy, memory-mapped, as
curate/_work/embeddings holds them) and reports:

- ``index_mb``: the anonymous RSS the built index holds (faiss's inverted lists: codes + ids)
- ``peak_mb``: the peak anonymous RSS of the whole dedup call above its start
- ``seconds``: the dedup call, index build included
- the dedup result: rows removed, and the sha256 of every row's group

Figures: index_mb ratio (8-bit / float32; target <= 0.35 at D=256: a quarter for the codes,
plus 8-byte ids) and the results agreeing exactly. Data: unit vectors around 2,000 centres
with planted near copies, half of them just above the 0.99 threshold and half just below
(cosine 0.985-0.995), closer to it than the codes' error, in chunks of 25,000 rows.

    python bench/dedup_index.py                       # 300k x 256 (the copy descriptor's size), ~4 min
    python bench/dedup_index.py --rows 250000 --dim 128
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.knn_memory import PeakWatch, anon_rss_mb  # noqa: E402

CHUNK_ROWS = 25_000
THRESHOLD = 0.99
COPY_SHARE = 0.04
TARGET = 0.35


def write_chunks(folder: Path, n: int, d: int, seed: int = 0) -> int:
    """Chunk .npy files of unit vectors, COPY_SHARE of them near copies of earlier rows of
    their chunk at a cosine of 0.985-0.995; returns how many copies are above THRESHOLD."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, d)).astype(np.float32)
    above = 0
    for index, start in enumerate(range(0, n, CHUNK_ROWS)):
        rows = min(CHUNK_ROWS, n - start)
        x = centres[rng.integers(2000, size=rows)] + rng.standard_normal((rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        copies = int(COPY_SHARE * rows)
        original, side = x[:copies], rng.standard_normal((copies, d), dtype=np.float32)
        side -= np.einsum("nd,nd->n", side, original)[:, None] * original  # orthogonal to its original
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        cosine = rng.uniform(0.985, 0.995, size=(copies, 1)).astype(np.float32)
        x[rows - copies:] = cosine * original + np.sqrt(1 - cosine ** 2) * side
        above += int((cosine > THRESHOLD).sum())
        np.save(folder / f"chunk-{index:06d}.copy.npy", x)
    return above


def build_float32(base, seed: int = 0):
    """The baseline's index: IVF over float32 vectors, lists, training sample and probes as
    data_curation.knn.build_ip_index has them."""
    import faiss

    from data_curation.knn import IpIndex, RowSet, _fill_ivf

    base = RowSet.of(base)
    nlist = int(4 * np.sqrt(len(base)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(base.dim), base.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(base.take(np.sort(rng.choice(len(base), size=min(len(base), 64 * nlist), replace=False))))
    index.nprobe = 16
    _fill_ivf(index, base, np.concatenate([index.quantizer.search(block, 1)[1][:, 0] for block in base.blocks()]))
    return IpIndex(index, base)


def run_one(mode: str, folder: Path) -> dict:
    import data_curation.dedup as dedup
    from data_curation.knn import RowSet

    parts = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("chunk-*.copy.npy"))]
    n = sum(len(p) for p in parts)
    build = build_float32 if mode == "float32" else dedup.build_ip_index
    held: list[float] = []

    def build_and_note(base, seed: int = 0):  # what dedup calls: the RSS once the index is built
        index = build(base, seed)
        held.append(anon_rss_mb())
        return index

    dedup.build_ip_index = build_and_note
    sha = np.array([f"{i:x}" for i in range(n)], dtype=object)
    start = time.perf_counter()
    with PeakWatch() as watch:
        result = dedup.deduplicate(sha, RowSet(parts), THRESHOLD)
    return {"mode": mode, "seconds": round(time.perf_counter() - start, 1),
            "index_mb": round(held[0] - watch.start, 1), "peak_mb": round(watch.above_start_mb, 1),
            "removed": int((~result.kept).sum()), "groups_sha256": hashlib.sha256(result.group.astype(np.int64).tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="pool size (above knn.FLAT_MAX)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]))))
        return
    from data_curation.knn import FLAT_MAX
    if args.rows <= FLAT_MAX:
        parser.error(f"--rows must be above knn.FLAT_MAX ({FLAT_MAX}), where the IVF index is used")
    with tempfile.TemporaryDirectory(prefix="vfm-dedup-index-") as tmp:
        planted_above = write_chunks(Path(tmp), args.rows, args.dim)
        runs = {}
        for mode in ("float32", "codes"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, tmp], check=True, capture_output=True,
                                 text=True)
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    vectors_mb = args.rows * args.dim * 4 / 2**20
    ratio = round(runs["codes"]["index_mb"] / runs["float32"]["index_mb"], 3)
    agree = all(runs["codes"][k] == runs["float32"][k] for k in ("removed", "groups_sha256"))
    print(json.dumps({"bench": "dedup_index", "rows": args.rows, "dim": args.dim, "vectors_mb": round(vectors_mb, 1),
                      "planted_copies_above_threshold": planted_above, **runs,
                      "index_mb_codes_over_float32": ratio,
                      "peak_mb_codes_over_float32": round(runs["codes"]["peak_mb"] / runs["float32"]["peak_mb"], 3),
                      "seconds_codes_over_float32": round(runs["codes"]["seconds"] / runs["float32"]["seconds"], 3),
                      "results_agree": agree, "target": f"index_mb ratio <= {TARGET}, results agree",
                      "pass": bool(agree and ratio <= TARGET)}, indent=2))


if __name__ == "__main__":
    main()
