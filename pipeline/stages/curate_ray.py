"""Ray glue of the curate stage: the embedding pass, the k-means assignment pass, and the
Ray resources each asks for (``auto`` resolved against the cluster).

Embedding: the listing chunks (one task each reads its chunk) -> decode tasks (read, hash,
decode, resize; CPU) -> an actor pool of frozen embedders (GPU actors when asked for) -> the
driver, which writes each chunk as soon as all of its rows are back. A killed run loses
at most the chunks in flight.

Assignment: one task per embedding chunk maps the chunk (memory-mapped) and assigns its
rows to the level-1 centroids, which are put in the object store once and shared.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import ray

from data_curation.decode import DecodeLimits
from data_curation.embedders import build_embedder, build_preparer
from data_curation.embedding_store import SPAN_COLUMNS, ChunkStore
from data_curation.hkmeans import assign
from data_curation.knn import faiss_has_gpu_support
from data_curation.listing import DamagedListing, read_chunk
from data_curation.progress import Progress
from data_curation.scan import decode_rows, embed_rows
from data_curation.storage import Storage, StorageError
from orchestration.ray_runtime import remote_cause, remote_text


@contextmanager
def _task_errors_in_one_line() -> Iterator[None]:
    """A store that a Ray Data task could not read or write fails the stage with the task's
    StorageError, one line naming the URI (not a remote traceback); the chunks already written
    stay for the rerun. A damaged listing chunk is raised as the task's DamagedListing, for the
    stage to list it again."""
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        if (cause := remote_cause(exc, StorageError)) is not None:  # Ray Data appends lines of its own
            raise StorageError(str(cause).splitlines()[0]) from None
        if (cause := remote_cause(exc, DamagedListing)) is not None:
            raise DamagedListing(cause.uri, cause.index, cause.reason) from None
        raise


@contextmanager
def _embedder_start_in_one_line(embedder: str) -> Iterator[None]:
    """An embedding actor that fails to start (a checkpoint that cannot be loaded) fails the
    stage with one line naming the setting and the actor's own error, not Ray's ActorDiedError
    with the actor's traceback."""
    try:
        yield
    except ray.exceptions.ActorDiedError as exc:
        if not getattr(exc, "actor_init_failed", False):
            raise
        lines = [line.strip() for line in remote_text(exc).splitlines() if line.strip()]
        raise RuntimeError(f"curate.embed.embedder {embedder}: the embedding actor could not start: "
                           f"{lines[-1] if lines else 'no reason given'}") from None


def embedding_pool(embed, gpus_in_cluster: Callable[[], float], images: int | None = None) -> tuple[int, float]:
    """(actors, GPUs per actor) of the embedding pool, with ``auto`` resolved: GPU actors
    when the embedder is a backbone and the cluster has a GPU (``gpus_in_cluster()``, asked
    only then), one per GPU; otherwise one CPU actor. For ``images`` to embed, no more actors
    than batches: each actor loads the model first, and Ray Data starts the whole pool at once,
    so a few images (a handful of retrieval seeds) take one actor."""
    gpus = embed.gpus_per_actor
    if gpus == "auto":
        gpus = 1.0 if embed.embedder != "builtin" and gpus_in_cluster() >= 1 else 0.0
    actors = embed.actors
    if actors == "auto":
        actors = max(1, int(gpus_in_cluster() // gpus)) if gpus > 0 else 1
    if images is not None:
        actors = min(actors, max(1, -(-images // embed.batch_size)))
    return int(actors), float(gpus)


def assign_task_gpus(cluster, gpus_in_cluster: Callable[[], float],
                     gpu_faiss: Callable[[], bool] = faiss_has_gpu_support) -> float:
    """GPUs of each level-1 assignment task, with ``auto`` resolved: one when faiss has GPU
    support (``gpu_faiss()``) and the cluster a GPU (``gpus_in_cluster()``, asked only then),
    else none."""
    if cluster.assign_gpus != "auto":
        return float(cluster.assign_gpus)
    return 1.0 if gpu_faiss() and gpus_in_cluster() >= 1 else 0.0


def _quiet_data_context() -> None:
    """No progress bars, and Ray Data's INFO lines (each dataset's plan and time, in tab-separated
    Ray format, between the stage's own progress lines) go only to its log file in the Ray session
    folder; its warnings still reach the console. The stage logs its progress itself."""
    ctx = ray.data.DataContext.get_current()  # first: importing ray.data sets up its loggers
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)
    # the notice that progress bars are off, printed because they were turned off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.enable_progress_bars = False
    ctx.execution_options.verbose_progress = False
    ctx.raise_original_map_exception = True  # the task's own exception, not a UserCodeException without it


def _decode_batch(batch: dict[str, np.ndarray], storage_options: dict, limits: DecodeLimits, embedder: str,
                  image_size: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    spans = None  # a listing written before tar spans were listed has none
    if "span_start" in batch:
        spans = [None if start < 0 else (int(start), int(end)) for start, end in zip(batch["span_start"], batch["span_end"],
                                                                                     strict=True)]
    rows = decode_rows([str(u) for u in batch["uri"]], Storage(storage_options), limits,
                       build_preparer(embedder, image_size), shape, spans)
    for column in SPAN_COLUMNS:  # kept with the chunk, for the manifest and the shard stage's reads
        rows[column] = np.asarray(batch[column] if column in batch else np.full(len(rows["uri"]), -1), dtype=np.int64)
    rows["chunk"] = np.asarray(batch["chunk"], dtype=np.int64)
    rows["row"] = np.asarray(batch["row"], dtype=np.int64)
    return rows


class EmbedActor:
    """Holds one frozen embedder for the actor's lifetime (the model loads once)."""

    def __init__(self, embedder: str, image_size: int, torch_threads: int, storage_options: dict | None = None):
        if embedder != "builtin":  # the built-in embedder is numpy only; importing torch costs seconds
            import torch

            torch.set_num_threads(max(1, torch_threads))
        self.embedder = build_embedder(embedder, image_size, Storage(storage_options))  # an s3:// checkpoint too

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return embed_rows(batch, self.embedder)


def _read_listing(batch: dict[str, np.ndarray], storage_options: dict) -> pa.Table:
    """The rows of one listing chunk (the batch names it). Read through the store rather than
    with ``ray.data.read_parquet``, whose file-listing step costs seconds a pass on its own."""
    (uri,), (index,), (rows,) = batch["listing"], batch["index"], batch["rows"]
    return read_chunk(str(uri), int(index), int(rows), Storage(storage_options))


def embed_chunks(listing: dict[int, str], expected_rows: dict[int, int], store: ChunkStore, *, limits: DecodeLimits,
                 embedder: str, image_size: int, prepared_shape: tuple[int, ...], batch_size: int, actors: int,
                 cpus_per_actor: float, gpus_per_actor: float,
                 on_chunk: Callable[[int], None] = lambda index: None) -> None:
    """Decode and embed the rows of the listing chunks ``listing`` (index -> URI; see
    :mod:`data_curation.listing`) and write each chunk to ``store`` once complete;
    ``expected_rows[index]`` says when it is. A listing chunk that cannot be read, or holds
    another number of rows, raises :class:`~data_curation.listing.DamagedListing`."""
    if not listing:
        return
    _quiet_data_context()
    storage = store.storage
    ds = ray.data.from_items([{"listing": uri, "index": index, "rows": expected_rows[index]}
                              for index, uri in listing.items()])
    ds = ds.map_batches(_read_listing, batch_size=1, batch_format="numpy", fn_kwargs={"storage_options": storage.s3})
    ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"storage_options": storage.s3, "limits": limits, "embedder": embedder,
                                   "image_size": image_size, "shape": prepared_shape})
    ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                        num_gpus=gpus_per_actor or None,
                        fn_constructor_kwargs={"embedder": embedder, "image_size": image_size,
                                               "torch_threads": int(max(1, cpus_per_actor)),
                                               "storage_options": storage.s3})
    pending: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    with _task_errors_in_one_line(), _embedder_start_in_one_line(embedder):
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            chunks = np.asarray(batch["chunk"], dtype=np.int64)
            for index in np.unique(chunks):
                part = {k: np.asarray(v)[chunks == index] for k, v in batch.items()}
                pending[int(index)].append(part)
                received[int(index)] += int((chunks == index).sum())
                if received[int(index)] == expected_rows[int(index)]:
                    parts = pending.pop(int(index))
                    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                    order = np.argsort(rows["row"], kind="stable")
                    store.write(int(index), {k: v[order] for k, v in rows.items()})
                    on_chunk(int(index))


def _assign_batch(batch: dict[str, np.ndarray], store_root: str, storage_options: dict, cache_dir: str,
                  centroids_ref: list) -> dict[str, np.ndarray]:
    centroids = ray.get(centroids_ref[0])  # wrapped in a list so Ray passes the reference, not the value
    store = ChunkStore(store_root, Storage(storage_options), cache_dir)
    out: dict[str, list[np.ndarray]] = {"chunk": [], "position": [], "label": [], "distance": []}
    for index, generation in zip(np.asarray(batch["chunk"], dtype=np.int64), batch["generation"], strict=True):
        embedding = store.vectors(int(index), "embedding", str(generation) or None)
        labels, dist = assign(embedding, centroids)
        out["chunk"].append(np.full(len(labels), index, dtype=np.int64))
        out["position"].append(np.arange(len(labels), dtype=np.int64))
        out["label"].append(labels)
        out["distance"].append(dist)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def assign_chunks(store: ChunkStore, chunks: dict[int, str | None], centroids: np.ndarray, gpus: float = 0.0,
                  log: Callable[[str], None] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Level-1 (labels, squared distances) of every accepted row of each chunk (index ->
    generation, see :attr:`Chunk.generation`), one Ray task per chunk reserving ``gpus`` (faiss
    searches on the GPUs it sees: none without one). A task maps its chunk through the store's
    cache folder, the same path on every node (on the driver's node, the driver's copy).
    ``log`` gets progress lines on a long pass (:class:`~data_curation.progress.Progress`)."""
    _quiet_data_context()
    chunk_indices = list(chunks)
    ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    ds = ray.data.from_items([{"chunk": int(i), "generation": chunks[i] or ""} for i in chunk_indices])
    ds = ds.map_batches(_assign_batch, batch_size=1, batch_format="numpy", num_gpus=gpus or None,
                        fn_kwargs={"store_root": store.root, "storage_options": store.storage.s3,
                                   "cache_dir": str(store.cache_dir) if store.cache_dir else None,
                                   "centroids_ref": [ref]})
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
    progress = Progress(log, "level-1 assignment", len(chunk_indices), "chunks")
    with _task_errors_in_one_line():
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for index in np.unique(batch["chunk"]):
                sel = batch["chunk"] == index
                parts[int(index)].append((batch["position"][sel], batch["label"][sel], batch["distance"][sel]))
            progress(len(parts))
    result = {}
    for index in chunk_indices:
        pos = np.concatenate([p[0] for p in parts.get(index, [])] or [np.zeros(0, np.int64)])
        order = np.argsort(pos, kind="stable")
        labels = np.concatenate([p[1] for p in parts.get(index, [])] or [np.zeros(0, np.int64)])[order]
        dist = np.concatenate([p[2] for p in parts.get(index, [])] or [np.zeros(0, np.float32)])[order]
        result[index] = (labels.astype(np.int64), dist.astype(np.float32))
    return result
