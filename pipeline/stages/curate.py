"""The curate stage: raw image pool -> curate/manifest.parquet, stats.json and plots.

Steps, each a data_curation call: list the sources into chunks (work folder) -> decode
and embed the chunks on Ray Data (work folder, one finished chunk at a time, so a killed
run resumes with the chunks it had) -> exact + near dedup -> balanced hierarchical
k-means (level-1 assignment on Ray Data) -> balanced sampling -> retrieval picks around
seed images (listed and embedded on Ray Data like the pool, into chunks of their own) ->
manifest, stats, plots. Only the chunks are kept between attempts: the later steps are
deterministic under the run seed and cheap beside embedding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_curation.decode import REJECT_REASONS, DecodeLimits
from data_curation.dedup import deduplicate, sha256_digests
from data_curation.demo_pool import IMAGES_DIR, LABELS_FILE, DemoPoolSpec, make_demo_pool, read_labels
from data_curation.embedders import ImageSizeError, build_preparer, check_embedder
from data_curation.embedding_store import Chunk, ChunkStore, DamagedChunks, chunk_indices, chunk_name
from data_curation.hkmeans import (
    MIN_RESAMPLE_SIZE,
    Hierarchy,
    KMeansParams,
    LevelSpec,
    fit_hierarchy,
    resampling_sample_size,
    training_rows,
)
from data_curation.knn import RowSet, faiss_has_gpu_support
from data_curation.manifest import build_manifest, normalized_entropy
from data_curation.progress import Progress
from data_curation.retrieval import retrieval_picks
from data_curation.sampling import balanced_sample, resolve_target
from data_curation.scan import prepared_shape
from data_curation.sources import (
    Listed,
    ListingCursor,
    ListingProblems,
    SourceError,
    iter_listed,
)
from data_curation.storage import Storage
from orchestration.ray_runtime import cluster_gpus
from orchestration.stage import Resources, Stage, StageContext
from pipeline.stages.curate_ray import assign_chunks, embed_chunks

MANIFEST_FILE = "manifest.parquet"
DEMO_SOURCE = "demo:"
_LISTING_DONE = "_DONE.json"
_LISTING_CURSOR = "vfm.listing"  # Parquet metadata key of a listing chunk: where the listing stood
_SEEDS_LOGGED = 20  # rejected seed images named in the log, one line each
_SEED_LISTING, _SEED_EMBEDDINGS = "seed_listing", "seed_embeddings"  # in the work folder, beside the pool's
_MANIFEST_ROW_GROUP = 1 << 17  # manifest rows per Parquet row group (a few chunks' worth)
_LISTING_FORMAT = 2  # 2: with tar spans; a listing stopped part way in another format is listed anew
_T = TypeVar("_T")


def kmeans_params(cfg, seed: int) -> KMeansParams:
    return KMeansParams(levels=tuple(LevelSpec(level.k, level.resampling_steps) for level in cfg.levels),
                        iterations=cfg.iterations, resample_iterations=cfg.resample_iterations,
                        max_points_per_centroid=cfg.max_points_per_centroid,
                        init_points_per_centroid=cfg.init_points_per_centroid, seed=seed)


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


def _log_resampling_cut(ctx: StageContext, levels, hierarchy: Hierarchy, n_train: int) -> None:
    """A line for each level that ran fewer resampling steps than configured, saying why."""
    points = [n_train] + [len(c) for c in hierarchy.centroids[:-1]]  # what each level clustered
    for number, (level, ran) in enumerate(zip(levels, hierarchy.resampling_steps_run, strict=True)):
        if ran >= level.resampling_steps:
            continue
        clusters = len(hierarchy.centroids[number])
        per_cluster = resampling_sample_size(points[number], clusters)
        if per_cluster < MIN_RESAMPLE_SIZE:
            why = (f"{points[number]} points in {clusters} clusters leave {per_cluster} per cluster to resample, "
                   f"fewer than {MIN_RESAMPLE_SIZE} (give the level at most a third as many clusters as points)")
        else:
            why = f"most of its {clusters} clusters are empty (fewer distinct points than clusters)"
        ctx.log(f"curate.cluster.levels[{number}]: {ran} of its {level.resampling_steps} resampling steps ran: {why}")


def decode_limits(cfg) -> DecodeLimits:
    """The ``curate.decode`` section as the decoder's limits."""
    return DecodeLimits(cfg.max_pixels, cfg.min_side, cfg.max_aspect)


def demo_pool_dir(ctx: StageContext) -> Path:
    if ctx.section.demo_dir:
        return Path(ctx.section.demo_dir)
    if not Storage.is_remote(ctx.dir):
        return Path(ctx.dir) / "demo_pool"
    # Shared by the runs of this user, so one folder per spec: another seed or size makes another pool.
    spec = f"seed{int(ctx.config.run.seed)}-head{ctx.section.demo_head_count}"
    return Path.home() / ".cache" / "vfm" / f"demo_pool-{spec}"


def write_listing(sources: list[str], root: str, storage: Storage, chunk_size: int, sniff: bool,
                  uri_column: str, log: Callable[[str], None] = lambda line: None,
                  log_every_s: float | None = None) -> tuple[dict[int, int], ListingProblems]:
    """Stream the sources into listing chunks (Parquet: chunk, row, uri, and span_start and
    span_end, a tar member's byte span in its tar, -1 for none) under ``root``;
    reuses a finished listing that found images. Returns rows per chunk and what listing skipped.

    Each chunk carries in its Parquet metadata where the listing stood after its last row, so
    a listing stopped part way picks up after its last whole chunk. ``log`` gets a progress
    line at most every ``log_every_s`` seconds (default
    :data:`~data_curation.progress.PROGRESS_EVERY_S`) while listing."""
    done_uri = Storage.join(root, _LISTING_DONE)
    try:
        done = storage.read_json(done_uri) if storage.exists(done_uri) else {}
    except ValueError as exc:  # damaged: the listing goes on after its last whole chunk, as if it had none
        log(f"warning: {done_uri} is damaged ({type(exc).__name__}): reading the listing's chunks instead")
        done = {}
    if done.get("rows"):
        return {int(k): int(v) for k, v in done["rows"].items()}, ListingProblems.from_json(done)
    rows, cursor = _listed_so_far(root, storage, sources, chunk_size)
    # Only a listing's last chunk is short, but a listing that ended before its _DONE was
    # written, of sources that have grown since, goes on after it: each chunk names the short
    # ones before it.
    short = {str(i): n for i, n in rows.items() if n < chunk_size}
    if rows:
        log(f"listing: picking up after {sum(rows.values())} images in {len(rows)} chunks")
    problems = cursor.problems.copy()
    batch: list[Listed] = []
    progress = Progress(log, "listing", None, "images", every_s=log_every_s, start_at=sum(rows.values()))

    def flush() -> None:
        index = len(rows)
        table = pa.table({"chunk": pa.array([index] * len(batch), pa.int64()),
                          "row": pa.array(np.arange(len(batch)), pa.int64()),
                          "uri": pa.array([item.uri for item in batch], pa.string()),
                          "span_start": pa.array([item.span[0] if item.span else -1 for item in batch], pa.int64()),
                          "span_end": pa.array([item.span[1] if item.span else -1 for item in batch], pa.int64())})
        rows[index] = len(batch)
        if len(batch) < chunk_size:
            short[str(index)] = len(batch)
        where = {"sources": _sources_digest(sources), "chunk_size": chunk_size, "cursor": cursor.to_json(),
                 "format": _LISTING_FORMAT, "short": short}
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({_LISTING_CURSOR: json.dumps(where)}), buf)
        storage.write_bytes(_listing_chunk(root, index), buf.getvalue())
        batch.clear()
        if progress.due():
            images = sum(rows.values())
            log(f"listing: {images} images in {len(rows)} chunks so far, {progress.rate(images):.0f} images/s")

    for item in iter_listed(sources, storage, sniff=sniff, uri_column=uri_column, problems=problems,
                            cursor=cursor):
        batch.append(item)
        if len(batch) == chunk_size:
            flush()
    if batch:
        flush()
    if rows:  # an empty listing is not kept: the next attempt lists the sources again, once they are fixed
        storage.write_json(done_uri, {"rows": rows, **problems.to_json()})
    return rows, problems


def _listing_chunk(root: str, index: int) -> str:
    return Storage.join(root, f"{chunk_name(index)}.parquet")


def _sources_digest(sources: list[str]) -> str:
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def _listed_so_far(root: str, storage: Storage, sources: list[str],
                   chunk_size: int) -> tuple[dict[int, int], ListingCursor]:
    """The rows of the whole chunks an unfinished listing of these sources wrote (0, 1, ...
    without a gap), and the cursor stored with the last of them; nothing to reuse: ({}, start)."""
    present = chunk_indices(root, storage)
    count = 0
    while count in present:
        count += 1
    for last in range(count - 1, -1, -1):  # a chunk without a readable cursor is listed again
        try:
            with storage.open(_listing_chunk(root, last), "rb") as f:
                meta = pq.ParquetFile(f).metadata
            where = json.loads((meta.metadata or {})[_LISTING_CURSOR.encode()])
        except (KeyError, ValueError, pa.ArrowException):  # not a whole chunk of this format
            continue
        if (where.get("sources") != _sources_digest(sources) or where.get("chunk_size") != chunk_size
                or where.get("format") != _LISTING_FORMAT):
            break
        short = where.get("short", {})
        rows = {i: int(short.get(str(i), chunk_size)) for i in range(last)}
        rows[last] = meta.num_rows
        return rows, ListingCursor.from_json(where["cursor"])
    return {}, ListingCursor()


def _pool_facts(store: ChunkStore, indices: list[int]) -> tuple[list[Chunk], np.ndarray, np.ndarray, dict[str, int]]:
    """The chunks ``indices`` (mapped vectors, metadata left in the store), accepted (N,) bool
    over their listed images, the accepted images' sha256 digests (see :func:`sha256_digests`)
    and the rejected images by reason, from each chunk's metadata in turn. Raises
    :class:`DamagedChunks` naming every damaged chunk, after reading them all."""
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    if not indices:
        return [], np.zeros(0, bool), sha256_digests(pa.array([], pa.string())), rejected
    chunks, accepted, digests = [], [], []
    for chunk in store.read_each(indices, ("reject_reason", "sha256"), damage_at_end=True):
        reasons = chunk.meta.column("reject_reason")
        ok = pc.is_null(reasons).to_numpy()
        accepted.append(ok)
        digests.append(sha256_digests(chunk.meta.column("sha256").filter(pa.array(ok))))
        for entry in pc.value_counts(reasons).to_pylist():
            if entry["values"] in rejected:
                rejected[entry["values"]] += int(entry["counts"])
        chunks.append(dataclasses.replace(chunk, meta=chunk.meta.select([])))
    return chunks, np.concatenate(accepted), np.concatenate(digests), rejected


def _mended(ctx: StageContext, read: Callable[[], _T], store: ChunkStore, embed: Callable[[], None],
            prefix: str = "") -> _T:
    """``read()`` of freshly embedded chunks. Chunks it finds damaged (a disk fault, a file cut
    short or removed by hand) would fail every attempt of the stage: they are logged, removed,
    embedded again through ``embed()``, and read once more; damaged again, they fail the stage."""
    try:
        return read()
    except DamagedChunks as exc:
        for index, reason in exc.damaged.items():
            ctx.log(f"{prefix}warning: embedding chunk {index} is damaged ({reason}): embedding it again")
        store.remove(exc.damaged)
    embed()
    return read()


def _log_problems(ctx: StageContext, problems: ListingProblems, prefix: str = "", shown: int = 20) -> None:
    lines = problems.lines()
    for line in lines[:shown]:
        ctx.log(f"{prefix}skipped: {line}")
    if len(lines) > shown:
        ctx.log(f"{prefix}skipped: ... and {len(lines) - shown} more (curate/stats.json lists them all)")


def _embedding_progress(ctx: StageContext, rows: dict[int, int], prefix: str = "") -> Callable[[int], None]:
    """A progress line for the first and the last finished chunk and for one in between at most
    every :data:`~data_curation.progress.PROGRESS_EVERY_S` (a fast cluster finishes many chunks
    a second): chunks and images done, rate, time left."""
    progress = Progress(ctx.log, f"{prefix}embedding", sum(rows.values()), "images")
    done: list[int] = []

    def on_chunk(index: int) -> None:
        done.append(rows[index])
        if progress.due(always=len(done) in (1, len(rows))):
            images = sum(done)
            ctx.log(f"{prefix}embedded chunk {index}: {len(done)}/{len(rows)} chunks, {images}/{progress.total} "
                    f"images, {progress.rate(images):.0f} images/s, {progress.left(images)}")
    return on_chunk


@dataclasses.dataclass
class _Seeds:
    """The embedded retrieval seeds: their chunks, the images listed and used, and the rejected
    ones counted by reason ("empty 1, not_an_image 2")."""

    chunks: list[Chunk]
    listed: int
    used: int
    rejected: str


def _chunk_store(ctx: StageContext, name: str) -> ChunkStore:
    """The embedding chunks in the work folder's ``name``. Local copies of remote chunks lie under
    the same relative path in the stage's cache, which the engine keeps when it keeps the chunks
    (named by their chunk's write, so never stale)."""
    return ChunkStore(Storage.join(ctx.work_dir, name), ctx.storage, ctx.cache_dir / "_work" / name)


def _embed_listing(ctx: StageContext, listing_root: str, rows_per_chunk: dict[int, int], store: ChunkStore,
                   limits: DecodeLimits, prefix: str = "") -> None:
    """Decode and embed, on Ray Data's actor pool, the listing chunks that ``store`` lacks."""
    if not rows_per_chunk:
        return
    embed = ctx.section.embed
    todo = sorted(set(rows_per_chunk) - store.done())
    actors, gpus = embedding_pool(embed, cluster_gpus, sum(rows_per_chunk[i] for i in todo))
    each = f"{embed.cpus_per_actor:g} CPU" + (f", {gpus:g} GPU" if gpus else "")
    n_chunks = len(rows_per_chunk)
    ctx.log(f"{prefix}{sum(rows_per_chunk.values())} images in {n_chunks} chunk{'s' * (n_chunks != 1)}; {len(todo)} "
            f"chunk{'s' * (len(todo) != 1)} to embed"
            + (f" on {actors} actor{'s' * (actors > 1)} ({each}{' each' * (actors > 1)})" if todo else ""))
    shape = prepared_shape(build_preparer(embed.embedder, embed.image_size))
    embed_chunks([_listing_chunk(listing_root, i) for i in todo],
                 {i: rows_per_chunk[i] for i in todo}, store, limits=limits, embedder=embed.embedder,
                 image_size=embed.image_size, prepared_shape=shape, batch_size=embed.batch_size,
                 actors=actors, cpus_per_actor=embed.cpus_per_actor, gpus_per_actor=gpus,
                 on_chunk=_embedding_progress(ctx, {i: rows_per_chunk[i] for i in todo}, prefix))


class CurateStage(Stage):
    name = "curate"
    extra_sections = ("run.seed",)  # the demo pool, k-means and sampling draw from it
    format_version = 1

    def reusable(self, config) -> dict[str, dict]:
        """The listing and the embeddings outlive a change of dedup, clustering, sampling or
        retrieval settings: embedding a pool again is most of curation's cost."""
        cfg = config.curate
        demo = ({"dir": cfg.demo_dir, "seed": int(config.run.seed), "head_count": cfg.demo_head_count}
                if DEMO_SOURCE in cfg.sources else None)
        listing = {"sources": cfg.sources, "demo": demo, "sniff": cfg.sniff, "uri_column": cfg.uri_column,
                   "chunk_size": cfg.embed.chunk_size}
        embeddings = {"listing": listing, "decode": cfg.decode.model_dump(mode="json"),
                      "embedder": cfg.embed.embedder,
                      "image_size": None if cfg.embed.embedder == "builtin" else cfg.embed.image_size}
        paths = {"_work/listing": listing, "_work/embeddings": embeddings}
        if cfg.retrieval.seeds:
            seed_listing = {**listing, "sources": cfg.retrieval.seeds, "demo": None}
            paths[f"_work/{_SEED_LISTING}"] = seed_listing
            paths[f"_work/{_SEED_EMBEDDINGS}"] = {**embeddings, "listing": seed_listing}
        if demo:
            paths["demo_pool"] = demo
        return paths

    def resources(self, config) -> Resources:
        embed = config.curate.embed
        actors, gpus = embedding_pool(embed, cluster_gpus)
        assign_gpus = assign_task_gpus(config.curate.cluster, cluster_gpus)
        asked_by = f"curate.embed.cpus_per_actor={embed.cpus_per_actor:g}, gpus_per_actor={gpus:g}" + (
            f"; curate.cluster.assign_gpus={assign_gpus:g}" if assign_gpus > gpus else "")
        return Resources(cpus=max(1.0, embed.cpus_per_actor), gpus=max(gpus, assign_gpus), asked_by=asked_by,
                         held_cpus=actors * embed.cpus_per_actor, held_gpus=actors * gpus,
                         held_by=f"curate.embed.actors={actors} x cpus_per_actor={embed.cpus_per_actor:g}, "
                                 f"gpus_per_actor={gpus:g}")

    def run(self, ctx: StageContext) -> dict[str, float]:
        cfg, storage, seed = ctx.section, ctx.storage, int(ctx.config.run.seed)
        try:  # before listing: an embedder that cannot run fails here, not in a Ray actor
            check_embedder(cfg.embed.embedder, cfg.embed.image_size, storage)
        except ImageSizeError as exc:
            raise ValueError(f"curate.embed.{exc}") from None
        except ValueError as exc:
            raise ValueError(f"curate.embed.embedder {cfg.embed.embedder}: {exc}") from None
        demo = self._demo_images(ctx, seed) if DEMO_SOURCE in cfg.sources else None
        sources = [s for s in cfg.sources if s != DEMO_SOURCE] + ([demo] if demo else [])
        limits = decode_limits(cfg.decode)

        listing_root = Storage.join(ctx.work_dir, "listing")
        try:
            rows_per_chunk, problems = write_listing(sources, listing_root, storage, cfg.embed.chunk_size,
                                                     cfg.sniff, cfg.uri_column, log=ctx.log)
        except SourceError as exc:
            raise SourceError(f"curate.sources: {exc}") from None
        _log_problems(ctx, problems)
        seed_rows = self._list_seeds(cfg, ctx)  # now, so that a bad seed source fails before the pool is embedded
        store = _chunk_store(ctx, "embeddings")
        embed_pool = functools.partial(_embed_listing, ctx, listing_root, rows_per_chunk, store, limits)
        embed_pool()
        seed_store = _chunk_store(ctx, _SEED_EMBEDDINGS)
        embed_seeds = functools.partial(_embed_listing, ctx, Storage.join(ctx.work_dir, _SEED_LISTING), seed_rows,
                                        seed_store, limits, "retrieval seeds: ")
        embed_seeds()
        seeds = _mended(ctx, lambda: self._seeds(cfg, ctx, seed_store, seed_rows), seed_store, embed_seeds,
                        "retrieval seeds: ")

        # The vectors stay mapped and each image's metadata in its chunk, read a chunk at a time:
        # what the driver keeps per image is a few flags, ids and its sha256's 32 bytes.
        chunks, accepted, digests, rejected = _mended(ctx, lambda: _pool_facts(store, sorted(rows_per_chunk)),
                                                      store, embed_pool)
        n = len(accepted)
        if n == 0:
            skipped = "; ".join(problems.lines())
            raise ValueError(f"no images found in curate.sources {cfg.sources}" + (f" ({skipped})" if skipped else ""))
        accepted_rows = np.flatnonzero(accepted)
        reasons_seen = ", ".join(f"{reason} {count}" for reason, count in rejected.items() if count)
        if len(accepted_rows) == 0:  # nothing worth keeping: the next attempt reads the fixed sources anew
            store.clear()
            storage.rm(listing_root, recursive=True)
            raise ValueError(f"none of the {n} images in curate.sources {cfg.sources} could be used; "
                             f"rejected: {reasons_seen}")

        dedup = self._dedup(cfg, chunks, digests, ctx)
        del digests
        kept_rows = accepted_rows[dedup.kept]
        ctx.log(f"{len(accepted_rows)} accepted, {n - len(accepted_rows)} rejected"
                + (f" ({reasons_seen})" if reasons_seen else "")
                + f"; {len(kept_rows)} after dedup ({dedup.n_exact} exact, {dedup.n_near} near duplicates removed)")

        try:  # before clustering: a target that selects nothing fails at once
            target = resolve_target(cfg.sample.target, len(kept_rows))
        except ValueError:
            raise ValueError(f"curate.sample.target {cfg.sample.target} of the {len(kept_rows)} images left after "
                             f"dedup is less than one image; give a larger fraction or a count") from None
        hierarchy, level1, distance = self._cluster(cfg, store, chunks, dedup.kept, seed, ctx)
        levels = hierarchy.levels_of(level1)  # (n_kept, L)
        if isinstance(cfg.sample.target, int) and cfg.sample.target > target:
            ctx.log(f"curate.sample.target {cfg.sample.target} is more than the {target} images left after "
                    f"dedup: all of them are selected")
        picked = balanced_sample(levels, target, seed,
                                 leaf_pick=cfg.sample.leaf_pick, distance=distance,
                                 weighting=cfg.sample.weighting)
        selected_by = np.full(n, None, dtype=object)
        selected_by[kept_rows[picked]] = "balanced"
        retrieved = self._retrieve(cfg, ctx, chunks, dedup.kept, seeds)
        fresh = kept_rows[retrieved][selected_by[kept_rows[retrieved]] == None]  # noqa: E711
        selected_by[fresh] = "retrieval"

        dup_group = np.full(n, -1, dtype=np.int64)
        dup_group[accepted_rows] = dedup.group
        dup_kept = np.zeros(n, dtype=bool)
        dup_kept[accepted_rows] = dedup.kept
        dup_kind = np.full(n, None, dtype=object)
        dup_kind[accepted_rows] = dedup.kind
        clusters = np.full((n, hierarchy.n_levels), -1, dtype=np.int64)
        clusters[kept_rows] = levels
        manifest = self._write_manifest(ctx, store, chunks, dup_group, dup_kept, dup_kind, clusters, selected_by)
        self._save_hierarchy(ctx, hierarchy)

        in_selection = np.isin(kept_rows, np.flatnonzero(selected_by != None))  # noqa: E711
        top = levels[:, -1]
        metrics: dict[str, float] = {
            "inputs": float(n), "accepted": float(len(accepted_rows)), "rejected": float(n - len(accepted_rows)),
            "duplicates": float((~dedup.kept).sum()), "duplicates_exact": float(dedup.n_exact),
            "duplicates_near": float(dedup.n_near), "kept_after_dedup": float(len(kept_rows)),
            "selected": float((selected_by != None).sum()),  # noqa: E711
            "selected_balanced": float((selected_by == "balanced").sum()),
            "selected_retrieval": float((selected_by == "retrieval").sum()),
            "retrieval_seeds": float(seeds.listed), "retrieval_seeds_used": float(seeds.used),
            "balance_before": normalized_entropy(top, len(np.unique(top))),
            "balance_after": normalized_entropy(top[in_selection], len(np.unique(top))),
        }
        metrics.update({f"rejected_{reason}": float(count) for reason, count in rejected.items()})
        metrics.update({"listing_bad_rows": float(problems.bad_rows),
                        "listing_broken_tars": float(len(problems.broken_tars)),
                        "listing_skipped_paths": float(len(problems.skipped_paths))})
        for level in range(hierarchy.n_levels):
            metrics[f"clusters_l{level + 1}"] = float(len(np.unique(levels[:, level])))
            metrics[f"resampling_steps_l{level + 1}"] = float(hierarchy.resampling_steps_run[level])
        # matplotlib is imported where a stage plots, not to build the stages (vfm status)
        from data_curation.plots import plot_cluster_sizes

        plots = [plot_cluster_sizes(level1, level1[in_selection], ctx.cache_dir / "plots" / "cluster_sizes.png")]
        if demo:
            plots.append(self._class_plot(ctx, demo, manifest, metrics))
        for path in plots:
            storage.put_file(path, Storage.join(ctx.dir, "plots", path.name))
            ctx.tracker.log_artifact(path, "plots")
        storage.write_json(Storage.join(ctx.dir, "stats.json"), {**metrics, "listing_problems": problems.lines()})
        hidden = (f"; demo pool's hidden-class balance {metrics['class_balance_before']:.3f} -> "
                  f"{metrics['class_balance_after']:.3f}") if "class_balance_after" in metrics else ""
        ctx.log(f"selected {int(metrics['selected'])} of {n}; balance of top clusters "
                f"{metrics['balance_before']:.3f} -> {metrics['balance_after']:.3f}{hidden}")
        return metrics

    @staticmethod
    def _dedup(cfg, chunks: list[Chunk], digests: np.ndarray, ctx: StageContext):
        key = "copy" if cfg.dedup.descriptor == "copy" else "embedding"
        vectors = RowSet([getattr(c, key) for c in chunks])
        return deduplicate(digests, vectors, cfg.dedup.threshold, cfg.dedup.k, log=ctx.log)

    @staticmethod
    def _write_manifest(ctx: StageContext, store: ChunkStore, chunks: list[Chunk], dup_group: np.ndarray,
                        dup_kept: np.ndarray, dup_kind: np.ndarray, clusters: np.ndarray,
                        selected_by: np.ndarray) -> Path:
        """curate/manifest.parquet (see :func:`build_manifest`; the arrays are per listed image)
        written from each chunk's metadata in turn, a row group at a time; returns the local
        file it was written to."""
        local = ctx.cache_dir / MANIFEST_FILE
        local.parent.mkdir(parents=True, exist_ok=True)
        pending: list[pa.Table] = []
        start = 0
        with contextlib.ExitStack() as stack:
            writer = None
            for number, meta in enumerate(store.read_meta_each(c.index for c in chunks), start=1):
                rows = slice(start, start + meta.num_rows)
                start = rows.stop
                pending.append(build_manifest(meta, dup_group[rows], dup_kept[rows], dup_kind[rows],
                                              clusters[rows], selected_by[rows]))
                if sum(t.num_rows for t in pending) >= _MANIFEST_ROW_GROUP or number == len(chunks):
                    table = pa.concat_tables(pending)
                    if writer is None:
                        writer = stack.enter_context(pq.ParquetWriter(local, table.schema))
                    writer.write_table(table)
                    pending = []
        ctx.storage.put_file(local, Storage.join(ctx.dir, MANIFEST_FILE))
        return local

    @staticmethod
    def _cluster(cfg, store: ChunkStore, chunks: list[Chunk], kept: np.ndarray, seed: int,
                 ctx: StageContext) -> tuple[Hierarchy, np.ndarray, np.ndarray]:
        """Fit on a sample of the kept rows, then assign all kept rows chunk by chunk on Ray."""
        params = kmeans_params(cfg.cluster, seed)
        kept_rows = np.flatnonzero(kept)  # positions among accepted rows
        train_rows = kept_rows[training_rows(len(kept_rows), params)]
        train = RowSet([c.embedding for c in chunks]).take(train_rows)  # (n_train, D), only the sample in RAM
        ctx.log(f"hierarchical k-means: fitting levels k = {[level.k for level in params.levels]} on "
                f"{len(train):,} of the {len(kept_rows):,} images left after dedup")
        hierarchy = fit_hierarchy(train, params, log=ctx.log)
        ctx.log(f"hierarchical k-means: levels {[len(c) for c in hierarchy.centroids]}, resampling steps run "
                f"{hierarchy.resampling_steps_run}")
        _log_resampling_cut(ctx, cfg.cluster.levels, hierarchy, len(train))
        gpus = assign_task_gpus(cfg.cluster, cluster_gpus)
        busy = {c.index: c.generation for c in chunks if len(c.embedding)}  # a chunk of rejects has nothing to assign
        ctx.log(f"level-1 assignment: {len(busy)} chunk task{'s' * (len(busy) != 1)}"
                + (f", {gpus:g} GPU each" if gpus else " on CPU"))
        assigned = assign_chunks(store, busy, hierarchy.centroids[0], gpus=gpus, log=ctx.log)
        nothing = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        labels = np.concatenate([assigned.get(c.index, nothing)[0] for c in chunks])[kept]
        distance = np.concatenate([assigned.get(c.index, nothing)[1] for c in chunks])[kept]
        return hierarchy, labels, distance

    @staticmethod
    def _list_seeds(cfg, ctx: StageContext) -> dict[int, int]:
        """The retrieval seeds listed into chunks of their own (rows per chunk; none without seeds)."""
        if not cfg.retrieval.seeds:
            return {}
        try:
            rows, problems = write_listing(cfg.retrieval.seeds, Storage.join(ctx.work_dir, _SEED_LISTING), ctx.storage,
                                           cfg.embed.chunk_size, cfg.sniff, cfg.uri_column,
                                           log=lambda line: ctx.log(f"retrieval seeds: {line}"))
        except SourceError as exc:
            raise SourceError(f"curate.retrieval.seeds: {exc}") from None
        _log_problems(ctx, problems, "retrieval seeds: ")
        if not rows:
            skipped = "; ".join(problems.lines())
            raise SourceError(f"curate.retrieval.seeds: no images found in {cfg.retrieval.seeds}"
                              + (f" ({skipped})" if skipped else ""))
        return rows

    @staticmethod
    def _seeds(cfg, ctx: StageContext, seed_store: ChunkStore, seed_rows: dict[int, int]) -> _Seeds:
        """The embedded seeds, right after they are embedded. Seeds are decoded with the pool's
        limits: a rejected seed is logged with its reason, and none left is an error at once (the
        pool's chunks stay; the seeds' listing and chunks go, so that the next attempt reads the
        fixed seed sources anew). Raises :class:`DamagedChunks` naming every damaged chunk."""
        chunks = list(seed_store.read_each(sorted(seed_rows), ("uri", "reject_reason"), damage_at_end=True))
        turned_away: list[tuple[str, str]] = []  # (uri, reason) of each rejected seed image
        for chunk in chunks:
            bad = chunk.meta.filter(pc.is_valid(chunk.meta["reject_reason"]))
            turned_away += zip(bad["uri"].to_pylist(), bad["reject_reason"].to_pylist(), strict=True)
        seeds = _Seeds(chunks, sum(seed_rows.values()), sum(len(c.embedding) for c in chunks),
                       ", ".join(f"{reason} {count}" for reason, count in
                                 sorted(Counter(reason for _, reason in turned_away).items())))
        if chunks and seeds.used == 0:
            seed_store.clear()
            ctx.storage.rm(Storage.join(ctx.work_dir, _SEED_LISTING), recursive=True)
            raise ValueError(f"curate.retrieval.seeds {cfg.retrieval.seeds}: none of the {seeds.listed} "
                             f"seed images could be used; rejected: {seeds.rejected}")
        for uri, reason in turned_away[:_SEEDS_LOGGED]:
            ctx.log(f"retrieval seeds: {uri} rejected: {reason}")
        if len(turned_away) > _SEEDS_LOGGED:
            ctx.log(f"retrieval seeds: ... and {len(turned_away) - _SEEDS_LOGGED} more rejected")
        return seeds

    @staticmethod
    def _retrieve(cfg, ctx: StageContext, chunks: list[Chunk], kept: np.ndarray, seeds: _Seeds) -> np.ndarray:
        """Positions among kept rows of the k nearest pool images of each seed image used."""
        if not seeds.chunks:
            return np.zeros(0, dtype=np.int64)
        pool = RowSet([c.embedding for c in chunks]).subset(np.flatnonzero(kept))
        picks = retrieval_picks(pool, RowSet([c.embedding for c in seeds.chunks]), cfg.retrieval.k, log=ctx.log)
        ctx.log(f"retrieval: {seeds.used} of {seeds.listed} seed images used"
                + (f" ({seeds.rejected} rejected)" if seeds.rejected else "")
                + f"; {len(picks)} pool images within the {cfg.retrieval.k} nearest of a seed")
        return picks

    @staticmethod
    def _save_hierarchy(ctx: StageContext, hierarchy: Hierarchy) -> None:
        for level, centroids in enumerate(hierarchy.centroids, start=1):
            buf = io.BytesIO()
            np.save(buf, centroids)
            ctx.storage.write_bytes(Storage.join(ctx.dir, "clusters", f"centroids_l{level}.npy"), buf.getvalue())
        for level, parent in enumerate(hierarchy.parents, start=1):
            buf = io.BytesIO()
            np.save(buf, parent)
            ctx.storage.write_bytes(Storage.join(ctx.dir, "clusters", f"parent_l{level}.npy"), buf.getvalue())

    @staticmethod
    def _demo_images(ctx: StageContext, seed: int) -> str:
        """The demo pool's images folder. It is written to local disk; under a remote run dir it
        is also copied into the curate folder, so that decode tasks on every node of a cluster
        read it (labels.parquet goes last and marks a complete copy)."""
        local = demo_pool_dir(ctx)
        try:
            images = make_demo_pool(local, DemoPoolSpec(head_count=ctx.section.demo_head_count, seed=seed))
        except ValueError as exc:
            raise ValueError(f"curate.demo_dir: {exc}") from None
        if not Storage.is_remote(ctx.dir):
            return str(images)
        remote = Storage.join(ctx.dir, "demo_pool")
        if not ctx.storage.exists(Storage.join(remote, LABELS_FILE)):
            ctx.log(f"copying the demo pool to {remote}")
            ctx.storage.put_tree(images, Storage.join(remote, IMAGES_DIR))
            ctx.storage.put_file(local / LABELS_FILE, Storage.join(remote, LABELS_FILE))
        return Storage.join(remote, IMAGES_DIR)

    def _class_plot(self, ctx: StageContext, demo_images: str, manifest_file: Path,
                    metrics: dict[str, float]) -> Path:
        """Hidden-class balance of the demo pool, before (accepted) and after (selected). Images
        are matched on their file name within ``demo_images`` (local or a remote copy)."""
        labels = read_labels(demo_pool_dir(ctx)).to_pydict()
        class_of = {posixpath.basename(u): c for u, c in zip(labels["uri"], labels["class"], strict=True) if c}

        def folder(uri: str) -> str:
            return uri if Storage.is_remote(uri) else os.path.abspath(uri)

        home = folder(demo_images)
        manifest = pq.read_table(manifest_file, columns=["uri", "reject_reason", "selected"])
        names = [posixpath.basename(u) if posixpath.dirname(folder(u)) == home else None
                 for u in manifest.column("uri").to_pylist()]
        accepted = [r is None for r in manifest.column("reject_reason").to_pylist()]
        selected = manifest.column("selected").to_pylist()
        before = [class_of[u] for u, a in zip(names, accepted, strict=True) if a and u in class_of]
        after = [class_of[u] for u, s in zip(names, selected, strict=True) if s and u in class_of]
        n_classes = len(set(class_of.values()))
        metrics["class_balance_before"] = normalized_entropy(np.asarray(before), n_classes)
        metrics["class_balance_after"] = normalized_entropy(np.asarray(after), n_classes)
        from data_curation.plots import plot_class_histogram

        return plot_class_histogram(before, after, ctx.cache_dir / "plots" / "class_histogram.png")
