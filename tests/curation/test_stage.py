"""The curate stage on a real local Ray: mixed bad pool, manifest schema, resume after a kill."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from data_curation import progress
from data_curation.builtin import load_builtin
from data_curation.decode import REJECT_REASONS
from data_curation.hkmeans import fit_hierarchy
from data_curation.listing import Listing
from data_curation.sources import SourceError
from data_curation.storage import Storage, StorageError
from models import backbone_spec, build_from_spec
from models.weights import export_backbone
from orchestration.engine import StageFailed
from orchestration.stage import StageContext
from pipeline.config.core import RunConfig
from pipeline.config.curate import ClusterConfig, CurateConfig, EmbedConfig
from pipeline.stages import curate
from pipeline.stages.curate import CurateStage
from pipeline.stages.curate_ray import assign_task_gpus, embedding_pool
from tests.curation.images import bad_files, encode, odd_files, write_tar
from tests.memory_tracker import MemoryTracker


class KilledAfterFirstChunk(StageContext):
    def log(self, message: str) -> None:
        super().log(message)
        if message.startswith("embedded chunk"):
            raise KeyboardInterrupt  # what a kill between two chunks looks like to the stage


@dataclass
class Recording(StageContext):
    """Keeps every line the stage logs."""
    lines: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        super().log(message)
        self.lines.append(message)


def _rejected_seeds(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("retrieval seeds: ") and "rejected" in line]


def _context(root: Path, section: CurateConfig, cls=StageContext, storage: Storage | None = None) -> StageContext:
    config = SimpleNamespace(run=RunConfig(seed=0), curate=section)
    return cls(name="curate", config=config, section=section, run_dir=str(root), dir=str(root / "curate"),
               work_dir=str(root / "curate" / "_work"), cache_dir=root / "cache", storage=storage or Storage(),
               tracker=MemoryTracker())


@pytest.fixture(scope="module")
def mixed_pool(tmp_path_factory) -> Path:
    """40 digits, an exact copy, every bad kind, every odd kind, a tar cut short after 2 digits,
    a hidden folder (not listed), a FIFO (reported); 2 seed images apart."""
    root = tmp_path_factory.mktemp("pool")
    pool = root / "pool"
    (pool / "sub").mkdir(parents=True)
    digits = load_builtin("digits")
    for i in range(40):
        big = np.kron(digits.images[i], np.ones((3, 3), dtype=np.uint8))  # 24x24
        (pool / ("sub" if i % 2 else "") / f"d{i:02d}.png").write_bytes(encode(Image.fromarray(big), "PNG"))
    (pool / "copy-of-d00.png").write_bytes((pool / "d00.png").read_bytes())
    for reason, (ext, data) in bad_files().items():
        (pool / f"bad-{reason}.{ext}").write_bytes(data)
    for kind, (ext, data) in odd_files().items():
        (pool / f"odd-{kind}.{ext}").write_bytes(data)
    third = write_tar(pool / "cut.tar", {  # 3 digits, cut inside the third header
        f"t{i}.png": encode(Image.fromarray(np.kron(digits.images[i], np.ones((3, 3), dtype=np.uint8))), "PNG")
        for i in (42, 43, 44)})[2]
    (pool / "cut.tar").write_bytes((pool / "cut.tar").read_bytes()[:third + 100])
    (pool / ".ipynb_checkpoints").mkdir()
    (pool / ".ipynb_checkpoints" / "d00-checkpoint.png").write_bytes((pool / "d00.png").read_bytes())
    os.mkfifo(pool / "fifo.png")  # reading it would wait forever
    seeds = root / "seeds"
    seeds.mkdir()
    for i in (40, 41):
        big = np.kron(digits.images[i], np.ones((3, 3), dtype=np.uint8))
        (seeds / f"s{i}.png").write_bytes(encode(Image.fromarray(big), "PNG"))
    (seeds / "s-empty.png").write_bytes(b"")
    return root


def _section(root: Path) -> CurateConfig:
    return CurateConfig.model_validate({
        "sources": [str(root / "pool")],
        "decode": {"max_pixels": 5_000_000},
        "embed": {"chunk_size": 16, "batch_size": 8},
        "cluster": {"levels": [{"k": 6, "resampling_steps": 1}, {"k": 2, "resampling_steps": 1}]},
        "sample": {"target": 0.5},
        "retrieval": {"seeds": [str(root / "seeds")], "k": 2},
    })


def test_stage_survives_every_bad_kind_and_writes_the_manifest(ray_session, mixed_pool, tmp_path, monkeypatch):
    monkeypatch.setattr(curate, "_MANIFEST_ROW_GROUP", 20)  # chunks of 16: row groups of 2 chunks, the last of 1
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every step logs its progress lines
    ctx = _context(tmp_path, _section(mixed_pool), Recording)
    metrics = CurateStage().run(ctx)
    assert [line.split(" in ")[0] for line in ctx.lines if line.startswith("level-1 assignment: ") and "/4" in line] == [
        f"level-1 assignment: {n}/4 chunks" for n in (1, 2, 3)]
    assert "hierarchical k-means: fitting levels k = [6, 2] on 48 of the 48 images left after dedup" in ctx.lines
    assert any(line.startswith("k-means level 1/2 (k = 6, 48 points): first k-means done in ") for line in ctx.lines)
    manifest_file = pq.ParquetFile(tmp_path / "curate" / "manifest.parquet")
    assert manifest_file.num_row_groups == -(-int(metrics["inputs"]) // 32)
    manifest = manifest_file.read().to_pandas()
    listing = sorted((tmp_path / "curate" / "_work" / "listing").glob("chunk-*.parquet"))
    assert manifest.uri.tolist() == [u for f in listing for u in pq.read_table(f).column("uri").to_pylist()]
    n_bad, n_odd = len(bad_files()), len(odd_files())
    reasons = ", ".join(f"{reason} 1" for reason in REJECT_REASONS if reason in bad_files())
    near = int(metrics["duplicates_near"])
    assert metrics["duplicates_exact"] == 1
    assert (f"{41 + n_odd + 2} accepted, {n_bad} rejected ({reasons}); {41 + n_odd + 2 - 1 - near} after dedup "
            f"(1 exact, {near} near duplicates removed)") in ctx.lines
    assert len(manifest) == metrics["inputs"] == 40 + 1 + n_bad + n_odd + 2
    for reason in bad_files():
        rows = manifest[manifest.uri.str.contains(f"bad-{reason}")]
        assert rows.reject_reason.tolist() == [reason]
        assert metrics[f"rejected_{reason}"] == 1
    assert metrics["rejected"] == n_bad and metrics["accepted"] == 41 + n_odd + 2
    assert manifest[manifest.uri.str.contains("cut.tar")].reject_reason.isna().sum() == 2
    in_tar = manifest.uri.str.startswith("tar://")  # their spans, for the shard stage to read them alone
    assert manifest[in_tar].span_start.notna().all() and manifest[~in_tar].span_start.isna().all()
    assert metrics["listing_broken_tars"] == 1 and metrics["listing_bad_rows"] == 0
    assert metrics["listing_skipped_paths"] == 1 and not manifest.uri.str.contains("checkpoint").any()
    stats = json.loads((tmp_path / "curate" / "stats.json").read_text())
    assert len(stats["listing_problems"]) == 2 and "cut.tar ends early" in stats["listing_problems"][0]
    assert "fifo.png is neither a file nor a folder" in stats["listing_problems"][1]
    assert manifest[manifest.uri.str.contains("odd-")].reject_reason.isna().all()
    assert set(manifest.columns) >= {"id", "uri", "sha256", "width", "height", "reject_reason", "dup_group",
                                     "dup_kept", "dup_kind", "cluster_l1", "cluster_l2", "selected",
                                     "selected_by"}
    copy = manifest[manifest.uri.str.endswith("copy-of-d00.png")].iloc[0]
    original = manifest[manifest.uri.str.endswith("/d00.png")].iloc[0]
    assert copy.id == original.id and copy.dup_group == original.dup_group
    # "copy-of-d00.png" is listed first, so it is the one kept
    assert [copy.dup_kept, original.dup_kept, original.dup_kind] == [True, False, "exact"]
    accepted = manifest[manifest.reject_reason.isna()]
    assert accepted.dup_group.notna().all() and manifest[manifest.reject_reason.notna()].dup_group.isna().all()
    selected = manifest[manifest.selected]
    assert selected.dup_kept.all() and selected.cluster_l1.notna().all()
    assert set(selected.selected_by) <= {"balanced", "retrieval"}
    assert metrics["selected"] == len(selected) >= round(0.5 * metrics["kept_after_dedup"])
    assert metrics["selected_balanced"] == round(0.5 * metrics["kept_after_dedup"])
    for _, row in selected.iterrows():  # the shard stage re-reads the bytes and checks them
        assert Storage().read_bytes(row.uri) and row.sha256 == row.id
    assert ("cluster_sizes.png", "plots") in ctx.tracker.artifacts
    assert metrics["retrieval_seeds"] == 3 and metrics["retrieval_seeds_used"] == 2
    assert _rejected_seeds(ctx.lines) == [f"retrieval seeds: {mixed_pool}/seeds/s-empty.png rejected: empty"]
    # The seeds are embedded like the pool, on Ray's actors, into chunks a resumed attempt keeps.
    assert "retrieval seeds: 3 images in 1 chunk; 1 chunk to embed on 1 actor (1 CPU)" in ctx.lines
    assert len(list((tmp_path / "curate" / "_work" / "seed_embeddings").glob("chunk-*.parquet"))) == 1
    retrieval = [line for line in ctx.lines if line.startswith("retrieval: ")]
    assert len(retrieval) == 1 and re.fullmatch(  # 2 seeds x k = 2
        r"retrieval: 2 of 3 seed images used \(empty 1 rejected\); [1-4] pool images within the 2 nearest of a seed",
        retrieval[0])


def test_seed_chunks_are_kept_across_config_changes_that_leave_them_as_they_were(tmp_path):
    seed_folder = str(tmp_path / "seeds")

    def reusable(sample=None, retrieval=None, embed=None) -> dict:
        section = CurateConfig(sources=[str(tmp_path / "pool")], sample=sample or {}, embed=embed or {},
                               retrieval=retrieval or {"seeds": [seed_folder]})
        return CurateStage().reusable(SimpleNamespace(run=RunConfig(seed=0), curate=section))

    seeds = ["_work/seed_listing", "_work/seed_embeddings"]
    base = reusable()
    assert set(seeds) <= set(base)
    assert reusable(sample={"target": 0.5}) == base
    assert reusable(retrieval={"seeds": [seed_folder], "k": 3}) == base
    other_seeds = reusable(retrieval={"seeds": [str(tmp_path / "more-seeds")]})
    assert [p for p in base if other_seeds[p] != base[p]] == seeds
    other_embedder = reusable(embed={"embedder": "arch:vit_test"})
    assert [p for p in base if other_embedder[p] != base[p]] == ["_work/embeddings", "_work/seed_embeddings"]
    assert not set(seeds) & set(reusable(retrieval={"seeds": []}))


def test_the_embedding_pool_takes_one_gpu_actor_per_gpu_for_a_backbone_and_one_cpu_actor_otherwise():
    def gpus(n: float):
        return lambda: n

    def never() -> float:
        raise AssertionError("the cluster was asked for its GPUs")

    auto = EmbedConfig()
    backbone = EmbedConfig(embedder="/models/dinov3-vitl16")
    assert embedding_pool(auto, never) == (1, 0.0)  # the built-in embedder is numpy: no GPU, no question
    assert embedding_pool(backbone, gpus(8)) == (8, 1.0)
    assert embedding_pool(backbone, gpus(0)) == (1, 0.0)
    assert embedding_pool(backbone.model_copy(update={"gpus_per_actor": 0.5}), gpus(4)) == (8, 0.5)
    assert embedding_pool(backbone.model_copy(update={"actors": 3}), gpus(8)) == (3, 1.0)
    # No more actors than batches: each would load the model to embed nothing.
    assert embedding_pool(backbone, gpus(8), images=3 * backbone.batch_size - 1) == (3, 1.0)
    assert embedding_pool(backbone, gpus(8), images=3) == (1, 1.0)
    assert embedding_pool(backbone, gpus(8), images=0) == (1, 1.0)
    assert embedding_pool(backbone.model_copy(update={"gpus_per_actor": 0.0}), never) == (1, 0.0)
    # asked for GPUs on a CPU cluster: one actor, which the engine's resource check then refuses in one line
    assert embedding_pool(auto.model_copy(update={"gpus_per_actor": 1.0}), gpus(0)) == (1, 1.0)


def test_assignment_tasks_take_a_gpu_when_faiss_and_the_cluster_have_one():
    def never() -> float:
        raise AssertionError("the cluster was asked for its GPUs")

    auto = ClusterConfig()
    assert assign_task_gpus(auto, lambda: 8, gpu_faiss=lambda: True) == 1.0
    assert assign_task_gpus(auto, lambda: 0, gpu_faiss=lambda: True) == 0.0
    assert assign_task_gpus(auto, never, gpu_faiss=lambda: False) == 0.0  # faiss-cpu: no question
    assert assign_task_gpus(auto.model_copy(update={"assign_gpus": 0.5}), never) == 0.5


def test_a_level_too_narrow_to_resample_is_reported_with_what_to_change():
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    levels = ClusterConfig.model_validate({"levels": [{"k": 40, "resampling_steps": 2},
                                                      {"k": 20, "resampling_steps": 4}]}).levels
    hierarchy = fit_hierarchy(x, curate.kmeans_params(ClusterConfig(levels=levels), 0))
    lines: list[str] = []
    curate._log_resampling_cut(SimpleNamespace(log=lines.append), levels, hierarchy, len(x))
    assert lines == ["curate.cluster.levels[1]: 0 of its 4 resampling steps ran: 40 points in 20 clusters leave "
                     "1 per cluster to resample, fewer than 2 (give the level at most a third as many clusters "
                     "as points)"]


def test_a_pool_of_only_bad_images_fails_in_one_line_naming_sources_and_reasons(ray_session, tmp_path):
    pool = tmp_path / "only-bad"
    pool.mkdir()
    for reason, (ext, data) in bad_files().items():
        (pool / f"bad-{reason}.{ext}").write_bytes(data)
    section = CurateConfig.model_validate({"sources": [str(pool)], "decode": {"max_pixels": 5_000_000}})
    with pytest.raises(ValueError) as caught:
        CurateStage().run(_context(tmp_path, section))
    message = str(caught.value)
    assert "\n" not in message and str(pool) in message
    assert f"none of the {len(bad_files())} images" in message
    for reason in bad_files():
        assert f"{reason} 1" in message
    work = tmp_path / "curate" / "_work"  # emptied, so a resume after fixing the files reads them anew
    assert not (work / "listing").exists() and not (work / "embeddings").exists()


def test_a_backbone_giving_nan_rejects_each_image_by_name_not_the_stage_with_a_faiss_error(ray_session, tmp_path):
    # A backbone whose output is NaN (here its final norm's weights): each image is rejected as
    # embedding_not_finite; with none left, the stage says so in one line, as for undecodable files.
    backbone = build_from_spec(backbone_spec("vit_test"))
    with torch.no_grad():
        backbone.norm.weight.fill_(float("nan"))
    export_backbone(backbone, str(tmp_path / "nan-export"), fmt="vfm")
    pool = tmp_path / "digits"
    pool.mkdir()
    for i, image in enumerate(load_builtin("digits").images[:6]):
        (pool / f"d{i}.png").write_bytes(encode(Image.fromarray(np.kron(image, np.ones((3, 3), np.uint8))), "PNG"))
    section = CurateConfig.model_validate({"sources": [str(pool)], "embed": {"embedder": str(tmp_path / "nan-export"),
                                                                            "image_size": 32}})
    with pytest.raises(ValueError) as caught:
        CurateStage().run(_context(tmp_path, section))
    assert "\n" not in str(caught.value) and "none of the 6 images" in str(caught.value)
    assert "rejected: embedding_not_finite 6" in str(caught.value)


def test_a_missing_seed_source_fails_naming_the_field_before_anything_is_embedded(ray_session, mixed_pool, tmp_path):
    section = _section(mixed_pool).model_copy(deep=True)
    section.retrieval.seeds = [str(tmp_path / "no-seeds")]
    with pytest.raises(SourceError, match=r"^curate\.retrieval\.seeds: source .*no-seeds does not exist$"):
        CurateStage().run(_context(tmp_path, section))
    assert not list((tmp_path / "curate" / "_work").glob("embeddings/chunk-*"))


def test_seed_sources_without_images_fail_before_the_pool_is_embedded(ray_session, mixed_pool, tmp_path):
    section = _section(mixed_pool).model_copy(deep=True)
    (tmp_path / "empty-seeds").mkdir()
    (tmp_path / "empty-seeds" / "notes.txt").write_text("no images here")
    section.retrieval.seeds = [str(tmp_path / "empty-seeds")]
    with pytest.raises(SourceError, match=r"^curate\.retrieval\.seeds: no images found in \[.*empty-seeds'\]$"):
        CurateStage().run(_context(tmp_path, section))
    assert not list((tmp_path / "curate" / "_work").glob("embeddings/chunk-*"))


def test_seed_images_that_are_all_rejected_fail_in_one_line_and_the_pool_stays_embedded(ray_session, mixed_pool,
                                                                                       tmp_path):
    section = _section(mixed_pool).model_copy(deep=True)
    (tmp_path / "bad-seeds").mkdir()
    (tmp_path / "bad-seeds" / "a.png").write_bytes(b"")
    (tmp_path / "bad-seeds" / "b.png").write_bytes(b"not an image at all")
    section.retrieval.seeds = [str(tmp_path / "bad-seeds")]
    failing = _context(tmp_path, section, Recording)
    with pytest.raises(ValueError) as caught:
        CurateStage().run(failing)
    assert str(caught.value) == (f"curate.retrieval.seeds ['{tmp_path}/bad-seeds']: none of the 2 seed images could "
                                 f"be used; rejected: empty 1, not_an_image 1")
    assert not [line for line in failing.lines if "after dedup" in line]  # known once the seeds are embedded
    for i in range(22):  # more than are named one by one, the last of them
        (tmp_path / "bad-seeds" / f"z{i:02d}.png").write_bytes(b"")
    (tmp_path / "bad-seeds" / "zz.png").write_bytes(encode(Image.fromarray(
        np.kron(load_builtin("digits").images[0], np.ones((3, 3), dtype=np.uint8))), "PNG"))
    ctx = _context(tmp_path, section, Recording)
    CurateStage().run(ctx)
    assert "retrieval seeds: 25 images in 2 chunks; 2 chunks to embed on 1 actor (1 CPU)" in ctx.lines  # listed anew
    named = _rejected_seeds(ctx.lines)
    assert len(named) == 21 and named[0] == f"retrieval seeds: {tmp_path}/bad-seeds/a.png rejected: empty"
    assert named[-1] == "retrieval seeds: ... and 4 more rejected"
    assert len(list((tmp_path / "curate" / "_work").glob("embeddings/chunk-*.parquet"))) == 4


@pytest.mark.parametrize("embed, error", [
    ({"embedder": "arch:vit_test", "image_size": 20},
     r"curate\.embed\.image_size 20 is not a multiple of the patch size 8 of embedder arch:vit_test"),
    ({"embedder": "arch:vit_nope"}, r"curate\.embed\.embedder arch:vit_nope: unknown arch 'vit_nope'; choose one of .*"),
    ({"embedder": "/no/such/export"}, r"curate\.embed\.embedder /no/such/export: /no/such/export does not exist .*"),
])
def test_an_embedder_that_cannot_run_fails_in_one_line_before_the_pool_is_listed(mixed_pool, tmp_path, embed, error):
    section = _section(mixed_pool).model_copy(update={"embed": EmbedConfig.model_validate(embed)})
    with pytest.raises(ValueError) as caught:
        CurateStage().run(_context(tmp_path, section))
    assert re.fullmatch(error, str(caught.value))
    assert not (tmp_path / "curate" / "_work" / "listing").exists()


def test_a_checkpoint_that_cannot_be_loaded_fails_in_one_line_naming_the_embedder(ray_session, tmp_path):
    pool = tmp_path / "digits"
    pool.mkdir()
    for i, image in enumerate(load_builtin("digits").images[:3]):
        (pool / f"d{i}.png").write_bytes(encode(Image.fromarray(image), "PNG"))
    broken = tmp_path / "backbone.pth"
    broken.write_bytes(b"not a checkpoint")
    section = CurateConfig.model_validate({"sources": [str(pool)], "embed": {"embedder": str(broken)}})
    with pytest.raises(RuntimeError) as caught:
        CurateStage().run(_context(tmp_path, section))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"curate.embed.embedder {broken}: the embedding actor could not start: ")
    assert str(broken) in str(caught.value).split("could not start: ")[1]  # the loader's own line names the file


def test_sources_fixed_after_no_images_were_found_are_listed_again(ray_session, mixed_pool, tmp_path):
    pool = tmp_path / "later"
    pool.mkdir()
    section = CurateConfig.model_validate({"sources": [str(pool)], "sample": {"target": 0.5},
                                           "cluster": {"levels": [{"k": 4}, {"k": 2}]}})
    with pytest.raises(ValueError, match="no images found in curate.sources"):
        CurateStage().run(_context(tmp_path, section))
    for i in range(12):
        (pool / f"d{i}.png").write_bytes((mixed_pool / "pool" / f"d{2 * i:02d}.png").read_bytes())
    assert CurateStage().run(_context(tmp_path, section))["inputs"] == 12  # the same run dir, resumed


def test_listing_reports_progress_and_a_finished_listing_is_read_back(mixed_pool, tmp_path):
    lines: list[str] = []
    root = str(tmp_path / "listing")
    rows, problems = Listing([str(mixed_pool / "pool")], root, Storage(), 8).write(lines.append, log_every_s=0.0)
    assert len(lines) == len(rows) > 1 and all(v == 8 for i, v in rows.items() if i < len(rows) - 1)
    assert re.fullmatch(r"listing: 16 images in 2 chunks so far, \d+ images/s", lines[1])
    assert problems.broken_tars  # the tar cut short
    listed = pq.read_table(root).to_pandas()
    members = listed[listed.uri.str.startswith("tar://")]
    assert len(members) == 2 and (members.span_start >= 0).all() and (members.span_end > members.span_start).all()
    assert (listed[~listed.uri.str.startswith("tar://")].span_start == -1).all()
    again: list[str] = []
    assert Listing([str(mixed_pool / "pool")], root, Storage(), 8).write(again.append, log_every_s=0.0) == (rows,
                                                                                                problems)
    assert again == []  # read back, not listed again


class StopListing(Exception):
    """What a kill between two listing chunks looks like to Listing.write."""


def test_a_listing_stopped_part_way_picks_up_after_its_last_whole_chunk(mixed_pool, tmp_path):
    sources, root = [str(mixed_pool / "pool")], tmp_path / "listing"

    def listing(chunk_size: int, into: Path, log=lambda line: None):
        return Listing(sources, str(into), Storage(), chunk_size).write(log, log_every_s=0.0)

    def stop_after_two_chunks(line: str) -> None:
        if line.startswith("listing: 16 images in 2 chunks"):
            raise StopListing

    whole = listing(8, tmp_path / "whole")
    with pytest.raises(StopListing):
        listing(8, root, stop_after_two_chunks)
    stamps = {p.name: p.stat().st_mtime_ns for p in root.glob("chunk-*")}
    assert sorted(stamps) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    lines: list[str] = []
    assert listing(8, root, lines.append) == whole
    assert lines[0] == "listing: picking up after 16 images in 2 chunks"
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("chunk-*") if p.name in stamps} == stamps
    for i in whole[0]:
        name = f"chunk-{i:06d}.parquet"
        assert pq.read_table(root / name).equals(pq.read_table(tmp_path / "whole" / name)), name
    # Stopped listings of other settings are not picked up (a changed config also clears the stage).
    with pytest.raises(StopListing):
        listing(8, tmp_path / "other", stop_after_two_chunks)
    lines.clear()
    assert listing(5, tmp_path / "other", lines.append) == listing(5, tmp_path / "whole-5")
    assert not [line for line in lines if "picking up" in line]


def test_a_listing_that_ended_without_its_done_mark_goes_on_after_its_short_chunk(tmp_path):
    pool, root = tmp_path / "pool", str(tmp_path / "listing")
    pool.mkdir()
    png = encode(Image.fromarray(np.zeros((16, 16), np.uint8)), "PNG")
    for i in range(5):
        (pool / f"a{i}.png").write_bytes(png)

    def listing():
        return Listing([str(pool)], root, Storage(), 2).write()[0]

    assert listing() == {0: 2, 1: 2, 2: 1}
    (tmp_path / "listing" / "_DONE.json").unlink()  # killed after its last chunk, before the mark
    for i in range(3):  # and the folder has grown since
        (pool / f"b{i}.png").write_bytes(png)
    assert listing() == {0: 2, 1: 2, 2: 1, 3: 2, 4: 1}
    (tmp_path / "listing" / "_DONE.json").write_bytes(b'{"rows": {"0"')  # a mark cut short: as good as none
    rows = listing()  # picks up after chunk 4, knowing that chunk 2 is short
    assert rows == {i: pq.read_metadata(tmp_path / "listing" / f"chunk-{i:06d}.parquet").num_rows for i in range(5)}
    assert sorted(pq.read_table(root).column("uri").to_pylist()) == sorted(str(p) for p in pool.iterdir())


def test_a_killed_embedding_resumes_with_its_finished_chunks(ray_session, mixed_pool, tmp_path):
    section = _section(mixed_pool)
    with pytest.raises(KeyboardInterrupt):
        CurateStage().run(_context(tmp_path, section, KilledAfterFirstChunk))
    chunks = tmp_path / "curate" / "_work" / "embeddings"
    finished = sorted(chunks.glob("chunk-*.parquet"))
    assert len(finished) == 1  # 4 chunks listed, killed after the first finished one
    stamps = {p.name: os.stat(p).st_mtime_ns for p in chunks.glob(f"{finished[0].stem}*")}
    metrics = CurateStage().run(_context(tmp_path, section))
    assert len(list(chunks.glob("chunk-*.parquet"))) == 4
    assert {p.name: os.stat(p).st_mtime_ns for p in chunks.glob(f"{finished[0].stem}*")} == stamps
    assert metrics["inputs"] == pq.read_metadata(tmp_path / "curate" / "manifest.parquet").num_rows


def test_a_damaged_listing_chunk_is_listed_again_and_the_embedding_goes_on(ray_session, mixed_pool, tmp_path):
    section = _section(mixed_pool)
    with pytest.raises(KeyboardInterrupt):
        CurateStage().run(_context(tmp_path, section, KilledAfterFirstChunk))
    work = tmp_path / "curate" / "_work"
    finished = [p.stem for p in (work / "embeddings").glob("chunk-*.parquet")]
    damaged = next(p for p in sorted((work / "listing").glob("chunk-*.parquet")) if p.stem not in finished)
    whole = pq.read_table(damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short: every attempt failed on it before
    ctx = _context(tmp_path, section, Recording)
    metrics = CurateStage().run(ctx)
    assert f"warning: listing chunk {damaged} is damaged: ArrowInvalid" in "\n".join(ctx.lines)
    assert f"listed chunk {int(damaged.stem.split('-')[1])} again" in ctx.lines
    assert pq.read_table(damaged).equals(whole)
    manifest = pq.read_table(tmp_path / "curate" / "manifest.parquet")
    assert metrics["inputs"] == manifest.num_rows == pq.read_table(work / "listing").num_rows


def test_damaged_embedding_chunks_are_embedded_again_not_failed_on_every_attempt(ray_session, mixed_pool, tmp_path):
    section = _section(mixed_pool)
    CurateStage().run(_context(tmp_path, section))
    manifest = tmp_path / "curate" / "manifest.parquet"
    before = pq.read_table(manifest)
    chunks, seed_chunks = (tmp_path / "curate" / "_work" / name for name in ("embeddings", "seed_embeddings"))
    cut = chunks / "chunk-000001.embedding.npy"
    os.truncate(cut, os.path.getsize(cut) // 2)  # a disk fault, a copy cut short
    (chunks / "chunk-000002.copy.npy").unlink()
    (seed_chunks / "chunk-000000.embedding.npy").write_bytes(b"")
    whole = {p.name: os.stat(p).st_mtime_ns for p in chunks.glob("chunk-00000[03]*")}

    context = _context(tmp_path, section, Recording)
    CurateStage().run(context)
    warnings = [line for line in context.lines if "damaged" in line]
    assert [line.split(" is damaged")[0] for line in warnings] == [
        "retrieval seeds: warning: embedding chunk 0", "warning: embedding chunk 1", "warning: embedding chunk 2"]
    assert "mmap length is greater than file size" in warnings[1] and "FileNotFoundError" in warnings[2]
    assert {p.name: os.stat(p).st_mtime_ns for p in chunks.glob("chunk-00000[03]*")} == whole
    assert pq.read_table(manifest).equals(before)


def test_a_new_sampling_target_reuses_the_embeddings_and_a_new_embedder_only_the_listing(ray_session, mixed_pool,
                                                                                        tmp_path, mlflow_uri, capsys):
    from pipeline.config.root import load_config
    from pipeline.stages import pipeline_engine

    run_dir, work = tmp_path / "run", tmp_path / "run" / "curate" / "_work"

    def curate(*sets: str) -> tuple[dict[str, float], list[str]]:
        config = load_config("smoke", [f"curate.sources=['{mixed_pool / 'pool'}']", "curate.embed.chunk_size=16",
                                       f"mlflow.tracking_uri={mlflow_uri}", f"run.cache_dir={tmp_path / 'cache'}",
                                       *sets])
        lines: list[str] = []
        return pipeline_engine(config, str(run_dir), [CurateStage()], lines.append).run().metrics["curate"], lines

    def stamps(folder: str) -> dict[str, int]:
        return {p.name: os.stat(p).st_mtime_ns for p in (work / folder).iterdir()}

    first, _ = curate()
    listing, embeddings = stamps("listing"), stamps("embeddings")
    second, lines = curate("curate.sample.target=0.6")
    assert "[curate] its config changed: starting over, but keeping _work/listing, _work/embeddings " \
           "(made under the same settings)" in lines
    assert stamps("listing") == listing and stamps("embeddings") == embeddings  # nothing listed or embedded again
    assert second["selected"] > first["selected"] and second["inputs"] == first["inputs"]
    manifest = pq.read_table(tmp_path / "run" / "curate" / "manifest.parquet")
    assert sum(manifest.column("selected").to_pylist()) == second["selected"]  # outputs made anew
    third, lines = curate("curate.sample.target=0.6", "curate.embed.embedder=arch:vit_test",
                          "curate.embed.image_size=32")
    assert "[curate] its config changed: starting over, but keeping _work/listing (made under the same settings)" \
           in lines
    assert stamps("listing") == listing
    assert set(stamps("embeddings")) == set(embeddings) and not set(stamps("embeddings").items()) & set(
        embeddings.items())  # every chunk embedded again
    assert np.load(tmp_path / "run" / "curate" / "clusters" / "centroids_l1.npy").shape[1] == 64  # vit_test's
    _, lines = curate("curate.sample.target=0.6", "curate.embed.embedder=arch:vit_test",
                      "curate.embed.image_size=32", "run.seed=1")
    assert any("keeping _work/listing, _work/embeddings" in line for line in lines)  # new clusters, same embeddings
    capsys.readouterr()
    everything, _ = curate("curate.sample.target=100000", "curate.embed.embedder=arch:vit_test",
                           "curate.embed.image_size=32", "run.seed=1")
    kept = int(everything["kept_after_dedup"])
    assert f"[curate] curate.sample.target 100000 is more than the {kept} images left after dedup: all of them " \
           "are selected" in capsys.readouterr().err
    assert everything["selected_balanced"] == kept
    embedded = stamps("embeddings")
    with pytest.raises(StageFailed, match=rf"curate.sample.target 0.001 of the {kept} images left after dedup is "
                                          "less than one image"):
        curate("curate.sample.target=0.001", "curate.embed.embedder=arch:vit_test", "curate.embed.image_size=32",
               "run.seed=1")
    assert stamps("embeddings") == embedded  # nothing lost


def test_a_demo_pool_made_from_another_seed_is_refused_not_reused(tmp_path):
    from data_curation.demo_pool import DemoPoolSpec, make_demo_pool, pool_spec

    images = make_demo_pool(tmp_path / "demo", DemoPoolSpec(seed=3))
    before = sorted(p.name for p in images.iterdir())
    assert pool_spec(tmp_path / "demo") == DemoPoolSpec(seed=3)
    assert make_demo_pool(tmp_path / "demo", DemoPoolSpec(seed=3)) == images  # the same pool, reused
    with pytest.raises(ValueError, match=r"demo holds a demo pool made from DemoPoolSpec\(.*seed=3\), not "
                                         r"DemoPoolSpec\(.*seed=4\)"):
        make_demo_pool(tmp_path / "demo", DemoPoolSpec(seed=4))
    assert sorted(p.name for p in images.iterdir()) == before  # nothing of it was touched


@pytest.mark.slow
def test_demo_pool_curation_rebalances_the_hidden_classes(ray_session, tmp_path):
    ctx = _context(tmp_path, CurateConfig(), Recording)
    metrics = CurateStage().run(ctx)
    assert metrics["rejected"] == 5 and metrics["duplicates"] > 100
    assert "hierarchical k-means: levels [160, 16], resampling steps run [5, 5]" in ctx.lines
    assert not any("resampling steps ran" in line for line in ctx.lines)  # the default asks for none it cannot run
    assert ctx.lines[-1].endswith(f"demo pool's hidden-class balance {metrics['class_balance_before']:.3f} -> "
                                  f"{metrics['class_balance_after']:.3f}")
    assert metrics["class_balance_after"] > metrics["class_balance_before"] + 0.1
    assert ("class_histogram.png", "plots") in ctx.tracker.artifacts


@pytest.mark.slow
def test_archived_s3_objects_are_rejected_as_unreadable_and_the_stage_completes(ray_session, mixed_pool, moto_bucket,
                                                                                  tmp_path):
    """An object the store will not serve (Glacier, AccessDenied) fails every attempt the same
    way: it is a bad image, counted, not a reason to stop curating the pool."""
    client, bucket, storage = moto_bucket
    storage.put_tree(mixed_pool / "pool", f"s3://{bucket}/pool")
    cold = ["pool/d02.png", "pool/sub/d07.png"]
    for key in cold:
        client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key}, StorageClass="GLACIER")
    section = CurateConfig.model_validate({"sources": [f"s3://{bucket}/pool"], "decode": {"max_pixels": 5_000_000},
                                           "sample": {"target": 0.5}, "cluster": {"levels": [{"k": 4}, {"k": 2}]}})
    metrics = CurateStage().run(_context(tmp_path, section, Recording, storage))
    manifest = pq.read_table(tmp_path / "curate" / "manifest.parquet").to_pandas()
    unreadable = manifest[manifest.reject_reason == "unreadable"].uri.tolist()
    assert sorted(unreadable) == [f"s3://{bucket}/{key}" for key in cold]
    assert metrics["rejected_unreadable"] == 2 and metrics["rejected"] == len(bad_files()) + 2
    assert metrics["accepted"] == 41 + len(odd_files()) + 2 - 2


class StoreGoneBeforeEmbedding(StageContext):
    """The S3 store holding the pool cannot be reached once the pool is listed, before any image
    is read: the embedding tasks, which take the stage storage's options when the pass starts,
    get an endpoint where nothing listens (stopping the server would cost ~20 s to restart it)."""

    def log(self, message: str) -> None:
        super().log(message)
        if "to embed" in message:
            self.storage.s3.update(endpoint_url="http://127.0.0.1:9")


@pytest.mark.slow
def test_an_unreachable_s3_pool_fails_the_stage_in_one_line_not_with_unreadable_images(ray_session, mixed_pool,
                                                                                        s3, tmp_path):
    s3.storage.put_tree(mixed_pool / "pool", s3.uri("pool"))
    section = CurateConfig.model_validate({"sources": [s3.uri("pool")], "sample": {"target": 0.5},
                                           "cluster": {"levels": [{"k": 4}, {"k": 2}]}})
    # It used to reject every image as unreadable and carry on.
    with pytest.raises(StorageError, match=rf"^cannot read {s3.uri('pool')}/\S+: EndpointConnectionError: [^\n]*$"):
        CurateStage().run(_context(tmp_path, section, StoreGoneBeforeEmbedding, s3.impatient_storage()))
    assert not list((tmp_path / "curate").glob("manifest*"))
    assert (tmp_path / "curate" / "_work" / "listing" / "_DONE.json").exists()  # kept for the rerun
