"""The shard stage: the curated manifest's selected images -> WebDataset shards with an index.

Writes under the stage folder shards/NAME-000000.tar ..., index.parquet, shards.json and
stats.json (see data_curation.shards.build); the plan and per-shard records go to the
work folder, so a rerun keeps intact shards and writes only missing or mismatching ones.
Sources are sized and groups of shards written by Ray tasks.
"""
from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from data_curation.shards.build import RECORDS_FOLDER, ShardSpec, build_shards
from data_curation.shards.encode import EncodeOptions
from data_curation.shards.index import SHARDS_FOLDER, record_uri
from data_curation.shards.plan import ShardLimits
from data_curation.shards.verify import verify_shards
from data_curation.shards.writer import RetryPolicy, ShardUploadError
from data_curation.storage import Storage
from orchestration.engine import CONFIG_FILE
from orchestration.ray_runtime import error_line, remote_cause
from orchestration.rundir import RunDir
from orchestration.stage import Resources, Stage, StageContext

MANIFEST_FILE = "manifest.parquet"
STAGE_FOLDER = "shard"  # the stage's folder in a run directory


def spec_from_config(cfg) -> ShardSpec:
    """The library's ShardSpec for a ShardConfig section."""
    return ShardSpec(prefix=cfg.name, limits=ShardLimits(cfg.samples_per_shard, cfg.max_shard_bytes, cfg.seed),
                     encode=EncodeOptions(cfg.max_side, cfg.encode_format, cfg.encode_quality),
                     retry=RetryPolicy(cfg.upload_attempts, cfg.upload_backoff_s),
                     shards_per_task=cfg.shards_per_task, stat_batch=cfg.stat_batch)


def ray_run_all(log: Callable[[str], None]):
    """A ``run_all`` for build_shards: each call is a 1-CPU Ray task; progress is logged as they
    finish. The first task that fails fails the call, and the tasks not finished are stopped: the
    stage has failed, and they would only hold the cluster's CPUs (a rerun redoes them)."""

    def run_all(fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(*args) for args in calls]
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done)
                except ray.exceptions.RayTaskError as exc:
                    if (cause := remote_cause(exc, ShardUploadError)) is not None:  # one line naming the shard
                        raise ShardUploadError(str(cause)) from None
                    raise
                log(f"{fn.__name__}: {len(refs) - len(pending)}/{len(refs)} tasks done")
        except BaseException:  # a failed task, or an interrupt
            _stop(pending, log)
            raise
        return ray.get(refs)

    return run_all


def _stop(refs: list, log: Callable[[str], None], patience_s: float = 30.0) -> None:
    """Kill the tasks of ``refs`` and wait until each has ended, before the error that stopped
    them is raised. Killed, not asked: a polite cancel waits for I/O, and their writes are
    atomic. A cancel that meets a task while it is being handed to a worker can miss it (Ray
    2.60, about one call in four here: the task then ran its whole course), so the tasks not
    ended after a second are cancelled again. An interrupt while waiting ends the wait, and
    Ray's own failure is a warning: neither may hide the error being raised."""
    deadline = time.monotonic() + patience_s
    try:
        while refs:
            for ref in refs:
                ray.cancel(ref, force=True)
            _, refs = ray.wait(refs, num_returns=len(refs), timeout=1.0, fetch_local=False)
            if refs and time.monotonic() > deadline:
                log(f"warning: {len(refs)} cancelled task{'s' * (len(refs) != 1)} still running after {patience_s:g} s")
                return
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
    except Exception as exc:  # the cluster failing too: the error that stopped the tasks is the one to see
        log(f"warning: could not stop {len(refs)} task{'s' * (len(refs) != 1)}: {error_line(exc)}")


def verify_cli(run_dir: str, storage: Storage, log: Callable[[str], None]) -> int:
    """``vfm verify RUN_DIR``: re-read every shard against the index; 0 when all are good, 1 when
    any is bad (each bad shard is named in a line of its own). The record of a bad shard is
    removed: a rerun of the stage keeps, unread, a shard whose record names its version, and
    now writes it again."""
    layout = RunDir(run_dir, storage)
    report = verify_shards(layout.stage_dir(STAGE_FOLDER), storage)
    records = Storage.join(layout.work_dir(STAGE_FOLDER), RECORDS_FOLDER)
    for name, reason in sorted(report.bad.items()):
        storage.rm(record_uri(records, name))
        log(f"bad shard {name}: {reason}")
    log(report.summary())
    if report.bad:
        log(f"to write the bad shards again: vfm run -c {shlex.quote(layout.path(CONFIG_FILE))} "
            f"--run-dir {shlex.quote(layout.uri)} --from shard")
    return 0 if report.ok else 1


class ShardStage(Stage):
    name = STAGE_FOLDER
    requires = ("curate",)
    format_version = 2

    def resources(self, config) -> Resources:
        return Resources(cpus=1)

    def run(self, ctx: StageContext) -> dict[str, float]:
        spec = spec_from_config(ctx.section)
        result = build_shards(Storage.join(ctx.upstream("curate"), MANIFEST_FILE), ctx.dir, ctx.work_dir, spec,
                              ctx.storage, ctx.cache_dir / "shard-scratch", ray_run_all(ctx.log), ctx.log)
        ctx.tracker.set_tags({"shards_uri": Storage.join(ctx.dir, SHARDS_FOLDER)})
        stats = result.stats(spec)
        return {"samples": float(stats["samples"]), "shards": float(stats["shards"]), "bytes": float(stats["bytes"]),
                "samples_skipped": float(sum(result.skipped.values())), "shards_kept": float(result.kept),
                "shards_rewritten": float(result.written)}
