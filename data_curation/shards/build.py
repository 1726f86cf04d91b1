"""Manifest -> shards, index.parquet, shards.json: the whole shard build, resumable.

The plan and one record per finished shard are kept in ``work_dir``; a rerun reuses the
plan (when the manifest and limits are unchanged), keeps every shard that still matches
its record and writes the rest. The parallel parts (sizing sources, writing groups of
shards) go through ``run_all``, which applies a function to a list of argument tuples and
returns the results in order: the stage passes one that runs them as Ray tasks, tests and
scripts the serial default.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_curation.shards.encode import EncodeOptions
from data_curation.shards.index import ShardRecord, write_index
from data_curation.shards.plan import (
    ShardLimits,
    load_plan,
    make_plan,
    plan_fingerprint,
    read_selected,
    save_plan,
    stat_sources,
)
from data_curation.shards.writer import RetryPolicy, shard_jobs, tidy_shard_folder, write_shard_group
from data_curation.storage import Storage

RunAll = Callable[[Callable[..., Any], Sequence[tuple]], list[Any]]
RECORDS_FOLDER = "records"  # in the work folder: one record per finished shard (index.py)


def run_serially(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
    return [fn(*args) for args in calls]


@dataclass(frozen=True)
class ShardSpec:
    """Everything that decides the shards, plus how the work is cut up."""

    prefix: str = "vfm"
    limits: ShardLimits = ShardLimits(samples=256, max_bytes=256 * 2**20, seed=0)
    encode: EncodeOptions = EncodeOptions()
    retry: RetryPolicy = RetryPolicy()
    shards_per_task: int = 4
    stat_batch: int = 2048


@dataclass
class BuildResult:
    records: list[ShardRecord]
    selected: int
    kept: int = 0
    written: int = 0
    missing: int = 0
    mismatching: int = 0
    leftovers_removed: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.records)

    def stats(self, spec: ShardSpec) -> dict:
        """What stats.json holds."""
        return {"selected": self.selected, "samples": self.samples, "shards": len(self.records),
                "bytes": sum(r.bytes for r in self.records), "reencoded": sum(r.reencoded for r in self.records),
                "skipped": dict(self.skipped), "shards_kept": self.kept, "shards_rewritten": self.written,
                "shards_missing": self.missing, "shards_mismatching": self.mismatching,
                "leftovers_removed": self.leftovers_removed, "limits": asdict(spec.limits),
                "encode": asdict(spec.encode)}


def _source_sizes(selected: pa.Table, storage: Storage, spec: ShardSpec, run_all: RunAll) -> list[int | None]:
    """Each selected source's size: the manifest's ``bytes`` (what curate read; a source gone
    since is counted missing by the writer), else looked up in the store (older manifests)."""
    sizes = selected["bytes"].to_pylist()
    todo = [i for i, size in enumerate(sizes) if size is None]
    uris = [selected["uri"][i].as_py() for i in todo]
    batches = [(uris[i:i + spec.stat_batch], storage) for i in range(0, len(uris), spec.stat_batch)]
    for i, size in zip(todo, [size for part in run_all(stat_sources, batches) for size in part], strict=True):
        sizes[i] = size
    return sizes


def build_shards(manifest_uri: str, shard_dir: str, work_dir: str, spec: ShardSpec, storage: Storage | None = None,
                 scratch_dir: Path | str | None = None, run_all: RunAll = run_serially,
                 log: Callable[[str], None] = print) -> BuildResult:
    """Write the shards of the manifest's selected rows under ``shard_dir`` and index them."""
    storage = storage or Storage()
    scratch = Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir(), "vfm-shard-scratch")
    manifest = storage.read_bytes(manifest_uri)
    selected, repeated = read_selected(manifest, manifest_uri)
    fingerprint = plan_fingerprint(manifest, spec.limits)
    plan_uri = Storage.join(work_dir, "plan.parquet")
    plan = load_plan(plan_uri, fingerprint, storage)
    if plan is None:
        plan = make_plan(selected, _source_sizes(selected, storage, spec, run_all), spec.limits)
        save_plan(plan, plan_uri, fingerprint, storage)
    else:
        log(f"reusing the shard plan in {plan_uri}")

    jobs = shard_jobs(plan, shard_dir, spec.prefix, spec.encode)
    result = BuildResult(records=[], selected=selected.num_rows + repeated)
    result.skipped["vanished_before_planning"] = selected.num_rows - plan.num_rows
    if repeated:
        result.skipped["repeated_id"] = repeated
    result.leftovers_removed = tidy_shard_folder(shard_dir, {j.name for j in jobs}, storage)
    log(f"{plan.num_rows} samples planned into {len(jobs)} shard{'s' * (len(jobs) != 1)}")
    record_dir = Storage.join(work_dir, RECORDS_FOLDER)
    step = spec.shards_per_task
    groups = [(jobs[i:i + step], record_dir, storage, spec.encode, scratch, spec.retry)
              for i in range(0, len(jobs), step)]
    for outcome in run_all(write_shard_group, groups):
        result.records += outcome.records
        result.kept += len(outcome.kept)
        result.written += len(outcome.written)
        result.missing += len(outcome.missing)
        result.mismatching += len(outcome.mismatching)
    for record in result.records:
        result.skipped.update(record.skipped)
    write_index(shard_dir, result.records, spec.prefix, storage)
    log(f"shards: {result.kept} kept, {result.written} rewritten "
        f"({result.missing} missing, {result.mismatching} mismatching)")
    if sum(result.skipped.values()):
        log("skipped samples: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items()) if v))
    storage.write_json(Storage.join(shard_dir, "stats.json"), result.stats(spec))
    return result
