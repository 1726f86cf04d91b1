"""The curate stage: raw image pool -> curate/manifest.parquet, stats.json and plots.

Steps, each a data_curation call: list the sources into chunks (work folder) -> decode
and embed the chunks on Ray Data (work folder, one finished chunk at a time, so a killed
run resumes with the chunks it had) -> exact + near dedup -> balanced hierarchical
k-means (level-1 assignment on Ray Data) -> balanced sampling -> retrieval picks around
seed images (listed and embedded on Ray Data like the pool, into chunks of their own) ->
manifest, stats, plots. Only the chunks are kept between attempts: the later steps are
deterministic under the run seed and cheap beside embedding.

Beside it: curate_ray (the Ray Data passes and the resources they ask for), curate_seeds
(the retrieval seeds) and curate_demo (the demo pool and its hidden-class report).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_curation.decode import REJECT_REASONS, DecodeLimits
from data_curation.dedup import deduplicate, sha256_digests
from data_curation.embedders import ImageSizeError, build_preparer, check_embedder
from data_curation.embedding_store import Chunk, ChunkStore, DamagedChunks
from data_curation.hkmeans import (
    MIN_RESAMPLE_SIZE,
    Hierarchy,
    KMeansParams,
    LevelSpec,
    fit_hierarchy,
    resampling_sample_size,
    training_rows,
)
from data_curation.knn import RowSet
from data_curation.listing import DamagedListing, Listing, log_problems
from data_curation.manifest import build_manifest, normalized_entropy
from data_curation.progress import Progress
from data_curation.sampling import balanced_sample, resolve_target
from data_curation.scan import prepared_shape
from data_curation.sources import SourceError
from data_curation.storage import Storage
from orchestration.ray_runtime import cluster_gpus
from orchestration.stage import Resources, Stage, StageContext
from pipeline.stages.curate_demo import DEMO_SOURCE, class_plot, demo_images
from pipeline.stages.curate_ray import assign_chunks, assign_task_gpus, embed_chunks, embedding_pool
from pipeline.stages.curate_seeds import SEED_EMBEDDINGS, SEED_LISTING, list_seeds, read_seeds, retrieve

MANIFEST_FILE = "manifest.parquet"
_MANIFEST_ROW_GROUP = 1 << 17  # manifest rows per Parquet row group (a few chunks' worth)
_T = TypeVar("_T")


def kmeans_params(cfg, seed: int) -> KMeansParams:
    return KMeansParams(levels=tuple(LevelSpec(level.k, level.resampling_steps) for level in cfg.levels),
                        iterations=cfg.iterations, resample_iterations=cfg.resample_iterations,
                        max_points_per_centroid=cfg.max_points_per_centroid,
                        init_points_per_centroid=cfg.init_points_per_centroid, seed=seed)


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


def _listing(ctx: StageContext, sources: list[str], name: str) -> Listing:
    """The listing of ``sources`` in the work folder's ``name``."""
    cfg = ctx.section
    return Listing(sources, Storage.join(ctx.work_dir, name), ctx.storage, cfg.embed.chunk_size, cfg.sniff,
                   cfg.uri_column)


def _chunk_store(ctx: StageContext, name: str) -> ChunkStore:
    """The embedding chunks in the work folder's ``name``. Local copies of remote chunks lie under
    the same relative path in the stage's cache, which the engine keeps when it keeps the chunks
    (named by their chunk's write, so never stale)."""
    return ChunkStore(Storage.join(ctx.work_dir, name), ctx.storage, ctx.cache_dir / "_work" / name)


def _spans(indices: list[int]) -> str:
    """Sorted indices as runs: [1, 2, 3, 7] -> "1-3, 7"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _embed_listing(ctx: StageContext, listing: Listing, rows_per_chunk: dict[int, int], store: ChunkStore,
                   limits: DecodeLimits, setting: str, prefix: str = "") -> None:
    """Decode and embed, on Ray Data's actor pool, the listing chunks that ``store`` lacks. A
    listing chunk found damaged is listed again, with every other one whose footer shows damage,
    and the chunks still lacking are embedded in a second pass; one damaged then fails the
    stage. ``setting`` (``curate.sources``) prefixes the error of a listing that cannot be mended."""
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

    def embed_pass(indices: list[int]) -> None:
        rows = {i: rows_per_chunk[i] for i in indices}
        embed_chunks({i: listing.chunk(i) for i in indices}, rows, store, limits=limits, embedder=embed.embedder,
                     image_size=embed.image_size, prepared_shape=shape, batch_size=embed.batch_size,
                     actors=actors, cpus_per_actor=embed.cpus_per_actor, gpus_per_actor=gpus,
                     on_chunk=_embedding_progress(ctx, rows, prefix))
    try:
        embed_pass(todo)
    except DamagedListing as exc:
        ctx.log(f"{prefix}warning: {exc}: listing it again")
        try:
            mended = listing.mend(rows_per_chunk, exc.index)
        except SourceError as error:
            raise SourceError(f"{setting}: {error}") from None
        ctx.log(f"{prefix}listed chunk{'s' * (len(mended) > 1)} {_spans(mended)} again")
        embed_pass(sorted(set(rows_per_chunk) - store.done()))


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
            paths[f"_work/{SEED_LISTING}"] = seed_listing
            paths[f"_work/{SEED_EMBEDDINGS}"] = {**embeddings, "listing": seed_listing}
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
        demo = demo_images(ctx) if DEMO_SOURCE in cfg.sources else None
        sources = [s for s in cfg.sources if s != DEMO_SOURCE] + ([demo] if demo else [])
        limits = decode_limits(cfg.decode)

        listing = _listing(ctx, sources, "listing")
        try:
            rows_per_chunk, problems = listing.write(log=ctx.log)
        except SourceError as exc:
            raise SourceError(f"curate.sources: {exc}") from None
        log_problems(ctx.log, problems)
        seed_listing = _listing(ctx, cfg.retrieval.seeds, SEED_LISTING)
        seed_rows = list_seeds(cfg, ctx, seed_listing)  # now: a bad seed source fails before the pool is embedded
        store = _chunk_store(ctx, "embeddings")
        embed_pool = functools.partial(_embed_listing, ctx, listing, rows_per_chunk, store, limits, "curate.sources")
        embed_pool()
        seed_store = _chunk_store(ctx, SEED_EMBEDDINGS)
        embed_seeds = functools.partial(_embed_listing, ctx, seed_listing, seed_rows, seed_store, limits,
                                        "curate.retrieval.seeds", "retrieval seeds: ")
        embed_seeds()
        seeds = _mended(ctx, lambda: read_seeds(cfg, ctx, seed_listing, seed_store, seed_rows), seed_store, embed_seeds,
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
            storage.rm(listing.root, recursive=True)
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
        retrieved = retrieve(cfg, ctx, chunks, dedup.kept, seeds)
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
            plots.append(class_plot(ctx, demo, manifest, metrics))
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
    def _save_hierarchy(ctx: StageContext, hierarchy: Hierarchy) -> None:
        for level, centroids in enumerate(hierarchy.centroids, start=1):
            buf = io.BytesIO()
            np.save(buf, centroids)
            ctx.storage.write_bytes(Storage.join(ctx.dir, "clusters", f"centroids_l{level}.npy"), buf.getvalue())
        for level, parent in enumerate(hierarchy.parents, start=1):
            buf = io.BytesIO()
            np.save(buf, parent)
            ctx.storage.write_bytes(Storage.join(ctx.dir, "clusters", f"parent_l{level}.npy"), buf.getvalue())
