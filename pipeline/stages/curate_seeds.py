"""The retrieval seeds of the curate stage: listed and embedded like the pool, into chunks of
their own; checked (a rejected seed is logged, none usable is an error); and the pool images
nearest each seed, which join the selection as retrieval picks."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pyarrow.compute as pc

from data_curation.embedding_store import Chunk, ChunkStore
from data_curation.knn import RowSet
from data_curation.listing import Listing, log_problems
from data_curation.retrieval import retrieval_picks
from data_curation.sources import SourceError
from orchestration.stage import StageContext

SEED_LISTING, SEED_EMBEDDINGS = "seed_listing", "seed_embeddings"  # in the work folder, beside the pool's
_LOGGED = 20  # rejected seed images named in the log, one line each


@dataclasses.dataclass
class Seeds:
    """The embedded retrieval seeds: their chunks, the images listed and used, and the rejected
    ones counted by reason ("empty 1, not_an_image 2")."""

    chunks: list[Chunk]
    listed: int
    used: int
    rejected: str


def list_seeds(cfg, ctx: StageContext, listing: Listing) -> dict[int, int]:
    """The retrieval seeds listed into chunks of their own (rows per chunk; none without seeds)."""
    if not cfg.retrieval.seeds:
        return {}
    try:
        rows, problems = listing.write(log=lambda line: ctx.log(f"retrieval seeds: {line}"))
    except SourceError as exc:
        raise SourceError(f"curate.retrieval.seeds: {exc}") from None
    log_problems(ctx.log, problems, "retrieval seeds: ")
    if not rows:
        skipped = "; ".join(problems.lines())
        raise SourceError(f"curate.retrieval.seeds: no images found in {cfg.retrieval.seeds}"
                          + (f" ({skipped})" if skipped else ""))
    return rows


def read_seeds(cfg, ctx: StageContext, listing: Listing, seed_store: ChunkStore, seed_rows: dict[int, int]) -> Seeds:
    """The embedded seeds, right after they are embedded. Seeds are decoded with the pool's
    limits: a rejected seed is logged with its reason, and none left is an error at once (the
    pool's chunks stay; the seeds' listing and chunks go, so that the next attempt reads the
    fixed seed sources anew). Raises :class:`DamagedChunks` naming every damaged chunk."""
    chunks = list(seed_store.read_each(sorted(seed_rows), ("uri", "reject_reason"), damage_at_end=True))
    turned_away: list[tuple[str, str]] = []  # (uri, reason) of each rejected seed image
    for chunk in chunks:
        bad = chunk.meta.filter(pc.is_valid(chunk.meta["reject_reason"]))
        turned_away += zip(bad["uri"].to_pylist(), bad["reject_reason"].to_pylist(), strict=True)
    seeds = Seeds(chunks, sum(seed_rows.values()), sum(len(c.embedding) for c in chunks),
                   ", ".join(f"{reason} {count}" for reason, count in
                             sorted(Counter(reason for _, reason in turned_away).items())))
    if chunks and seeds.used == 0:
        seed_store.clear()
        listing.storage.rm(listing.root, recursive=True)
        raise ValueError(f"curate.retrieval.seeds {cfg.retrieval.seeds}: none of the {seeds.listed} "
                         f"seed images could be used; rejected: {seeds.rejected}")
    for uri, reason in turned_away[:_LOGGED]:
        ctx.log(f"retrieval seeds: {uri} rejected: {reason}")
    if len(turned_away) > _LOGGED:
        ctx.log(f"retrieval seeds: ... and {len(turned_away) - _LOGGED} more rejected")
    return seeds


def retrieve(cfg, ctx: StageContext, chunks: list[Chunk], kept: np.ndarray, seeds: Seeds) -> np.ndarray:
    """Positions among kept rows of the k nearest pool images of each seed image used."""
    if not seeds.chunks:
        return np.zeros(0, dtype=np.int64)
    pool = RowSet([c.embedding for c in chunks]).subset(np.flatnonzero(kept))
    picks = retrieval_picks(pool, RowSet([c.embedding for c in seeds.chunks]), cfg.retrieval.k, log=ctx.log)
    ctx.log(f"retrieval: {seeds.used} of {seeds.listed} seed images used"
            + (f" ({seeds.rejected} rejected)" if seeds.rejected else "")
            + f"; {len(picks)} pool images within the {cfg.retrieval.k} nearest of a seed")
    return picks
