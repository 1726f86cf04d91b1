"""The ``curate`` section: sources, decoding limits, embedding, dedup, clustering, sampling."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from pipeline.config.base import EXECUTION, Section


class DecodeConfig(Section):
    max_pixels: int = Field(50_000_000, gt=0, description="Reject images with more pixels than this "
                            "(decompression bombs); checked from the header before decoding. Pillow's own "
                            "limit is raised to this where it is lower.")
    min_side: int = Field(8, ge=1, description="Reject images whose shorter side is below this.")
    max_aspect: float = Field(10.0, ge=1.0, description="Reject images whose long/short side ratio is above this.")


class EmbedConfig(Section):
    embedder: str = Field("builtin", description="'builtin' (HOG-like descriptor, no weights), "
                          "'arch:NAME' (a randomly initialised models/ backbone, for tests), or a path to a "
                          "vfm export, an HF DINOv3 folder or an official DINOv3 checkpoint.")
    image_size: int = Field(224, ge=16, description="Input side for backbone embedders (a multiple of the "
                            "patch size); the built-in embedder always uses 32.")
    batch_size: int = Field(256, ge=1, json_schema_extra=EXECUTION, description="Images per embedding batch.")
    chunk_size: int = Field(2048, ge=1, description="Images per embedding chunk: the unit of resume.")
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", json_schema_extra=EXECUTION,
        description="Embedding actors in the Ray Data actor pool; auto: one per GPU of the Ray cluster "
        "when the actors take GPUs, else 1.")
    cpus_per_actor: float = Field(
        1.0, gt=0, json_schema_extra=EXECUTION,
        description="CPUs each embedding actor reserves (also its torch threads). actors x cpus_per_actor must "
        "leave at least one CPU of the cluster free for the Ray Data read tasks that feed the pool; a run that "
        "would not is refused before it starts.")
    gpus_per_actor: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", json_schema_extra=EXECUTION,
        description="GPUs each embedding actor reserves; auto: 1 when the embedder is a backbone and the "
        "Ray cluster has a GPU, else 0 (the built-in embedder runs on CPU).")


class DedupConfig(Section):
    descriptor: Literal["copy", "embedding"] = Field("copy", description="What near duplicates are compared "
                                                    "on: the built-in copy-detection descriptor or the embedding.")
    threshold: float = Field(0.99, gt=0, lt=1, description="Cosine similarity above which two images are near "
                             "duplicates (below 1: no two images are more similar than 1; byte-identical ones are "
                             "always removed).")
    k: int = Field(16, ge=1, description="Neighbours searched per image.")


class LevelConfig(Section):
    k: int = Field(..., ge=1, description="Clusters at this level.")
    resampling_steps: int = Field(3, ge=0, description="Resampling steps at this level (Vo et al.). A step "
                                  "keeps half the mean cluster size of points per cluster and needs 2 or more: "
                                  "a level with fewer than ~3 points per cluster skips its steps, and the log "
                                  "says so.")


class ClusterConfig(Section):
    levels: list[LevelConfig] = Field(
        default_factory=lambda: [LevelConfig(k=160, resampling_steps=5), LevelConfig(k=16, resampling_steps=5)],
        description="Hierarchy levels, bottom (level 1, clusters the images) to top. The sample is split "
        "equally among the top clusters, so give the top level more clusters than the concepts you want "
        "balanced (this default: 16 for the demo pool's 13 hidden classes; measured in "
        "bench/curation_quality.py). Each level has several times fewer clusters than the one below (Vo et "
        "al.: 10 or more; this default: 10), so that each has points enough per cluster to resample.")
    iterations: int = Field(10, ge=1, description="Lloyd iterations of each level's first k-means.")
    resample_iterations: int = Field(1, ge=1, description="Lloyd iterations of each resampling step's fresh "
                                     "k-means, after its k-means++ seeding on the kept points.")
    max_points_per_centroid: int = Field(256, ge=4, description="Level 1 trains on at most this many points "
                                         "per centroid, drawn uniformly; every point is then assigned. At least "
                                         "4: a resampling step keeps half that many points per cluster, and "
                                         "needs 2.")
    init_points_per_centroid: int = Field(8, ge=1, description="k-means++ seeds from this many points per centroid.")
    assign_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", json_schema_extra=EXECUTION,
        description="GPUs each level-1 assignment task (one embedding chunk against the broadcast level-1 "
        "centroids, with faiss) reserves; auto: 1 when faiss has GPU support (faiss-gpu) and the Ray cluster "
        "has a GPU, else 0 (faiss on CPU). Ray hides the GPUs from a task that reserves none. A task that "
        "reserves a whole GPU runs beside as many others as there are GPUs, not CPUs: set 0 (or a fraction) "
        "where level 1 has few centroids and the CPUs outnumber the GPUs.")

    @field_validator("levels")
    @classmethod
    def _at_least_one_level_each_smaller(cls, levels: list[LevelConfig]) -> list[LevelConfig]:
        if not levels:
            raise ValueError("curate.cluster.levels needs at least one level")
        for number in range(1, len(levels)):
            below, above = levels[number - 1].k, levels[number].k
            if above >= below:  # it would be a copy of the level below (k is capped at its points)
                raise ValueError(f"levels[{number}] has k = {above}, not fewer than the {below} of levels[{number - 1}]: "
                                 f"each level clusters the centroids of the level below into fewer clusters")
        return levels


class SampleConfig(Section):
    target: int | float = Field(0.2, gt=0, description="Images to select: a whole number is a count (300; a "
                                "count above the deduplicated pool selects all of it, and the log says so), a "
                                "number with a decimal point a fraction of the deduplicated pool, at most 1.0 "
                                "(0.3; 1.0 keeps every image).")
    leaf_pick: Literal["random", "closest"] = Field("random", description="How a level-1 cluster gives its "
                                                    "share: random images or those closest to its centroid.")
    weighting: Literal["equal", "leaves"] = Field("equal", description="'equal': Vo et al.'s cap rule, every "
                                                  "child of a node has the same cap; 'leaves': caps scale with "
                                                  "the number of level-1 clusters below each child (measured "
                                                  "worse on the demo pool, see bench/curation_quality.py).")

    @field_validator("target")
    @classmethod
    def _count_or_fraction(cls, target: int | float) -> int | float:
        if isinstance(target, float) and target > 1:
            raise ValueError(f"{target} is neither a fraction of the pool (at most 1.0) nor a count (a whole "
                             f"number, written without a decimal point, e.g. {max(1, round(target))})")
        return target


class RetrievalConfig(Section):
    seeds: list[str] = Field(default_factory=list, description="Sources of seed images (folders, s3:// "
                             "prefixes, URI lists, tars); their k nearest pool images are added.")
    k: int = Field(8, ge=1, description="Pool images added per seed image.")


class CurateConfig(Section):
    sources: list[str] = Field(default_factory=lambda: ["demo:"], description="Image sources: folders, "
                               "s3:// prefixes, .parquet/.csv lists of URIs, WebDataset .tar (.tar.gz, .tgz) files; 'demo:' "
                               "generates the demo pool (MNIST/LFW/photos, Zipf-skewed, with duplicates).")
    demo_head_count: int = Field(480, ge=1, description="Images of the demo pool's most frequent hidden class; "
                                 "the other twelve follow a Zipf law below it (480: ~1,100 files; 160: ~370).")
    demo_dir: str | None = Field(None, description="Where 'demo:' writes its pool (local); default: "
                                 "demo_pool/ in the curate folder, or ~/.cache/vfm/demo_pool-seedN-headH (N = run.seed, "
                                 "H = demo_head_count) "
                                 "for remote run dirs, which also get a copy in their curate folder for every node "
                                 "to read.")
    sniff: bool = Field(True, description="List files without an image extension when their first bytes "
                        "look like an image.")
    uri_column: str = Field("uri", description="The column holding URIs in .parquet/.csv source lists.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
