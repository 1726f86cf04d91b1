"""Small stand-in stages and config for engine tests: real work on Ray, real files, real markers.

Run as a script it is a tiny `vfm`-like driver over these stages (used by the kill-and-resume test):
    STANDIN_SLEEP=1 python -m tests.orchestration.standin RUN_DIR MLFLOW_URI
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator

from pydantic import Field

from data_curation.storage import Storage
from orchestration.engine import Engine
from orchestration.stage import Resources, Stage, StageContext
from pipeline.config.base import EXECUTION, Section
from pipeline.config.core import MlflowConfig, RayConfig, RunConfig, StorageConfig
from pipeline.config.load import dump_config, flatten_config


class StepConfig(Section):
    value: int = 1
    note: str = ""  # changes the fingerprint, not what the pieces depend on
    fail: bool = False
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    held_cpus: float = Field(0.0, ge=0)
    workers: int = Field(1, ge=1, json_schema_extra=EXECUTION)  # how it runs: not in the fingerprint


class StandinConfig(Section):
    name: str = "standin"
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig(num_cpus=2)
    mlflow: MlflowConfig = MlflowConfig()
    storage: StorageConfig = StorageConfig()
    a: StepConfig = StepConfig()
    b: StepConfig = StepConfig()
    c: StepConfig = StepConfig()


def _square(x: int, fail: str = "") -> int:
    if fail:  # in the Ray task: the engine must report this error, not Ray's wrapper of it
        raise ValueError(fail)
    return x * x


@contextlib.contextmanager
def _store_locked(stage: str) -> Iterator[None]:
    """With STANDIN_LOCK_MLFLOW=STAGE:DB, while that stage logs its metrics another connection holds
    the sqlite store DB's write lock: an MLflow outage as processes sharing one store meet it."""
    name, _, db = os.environ.get("STANDIN_LOCK_MLFLOW", "").partition(":")
    if name != stage:
        yield
        return
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        lock.execute("ROLLBACK")
        lock.close()


class StepStage(Stage):
    """Computes value² on Ray, adds the upstream result, and writes it; step b checkpoints in 5 pieces."""

    def __init__(self, name: str, requires: tuple[str, ...]):
        self.name, self.requires = name, requires  # type: ignore[misc]

    def resources(self, config) -> Resources:
        section = getattr(config, self.name)
        return Resources(cpus=section.cpus, gpus=section.gpus, held_cpus=section.held_cpus,
                         held_by=f"{self.name}.held_cpus")

    def reusable(self, config) -> dict:
        return {"_work": {"value": getattr(config, self.name).value}}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        fail = f"{self.name} was told to fail" if ctx.section.fail else ""
        total = ray.get(ray.remote(_square).remote(ctx.section.value, fail))
        for up in self.requires:
            total += ctx.storage.read_json(ctx.storage.join(ctx.upstream(up), "out.json"))["total"]
        pieces_done = 0
        for i in range(5):  # inner checkpoints: a piece finished before a kill is not redone
            piece = ctx.storage.join(ctx.work_dir, f"piece-{i}.json")
            if ctx.storage.exists(piece):
                continue
            time.sleep(float(os.environ.get("STANDIN_SLEEP", "0")))  # outside the config: same fingerprint
            ctx.storage.write_json(piece, {"i": i})
            pieces_done += 1
        ctx.log(f"wrote {pieces_done} new pieces")
        with open(ctx.cache_dir / "values.log", "a") as seen:  # a local cache entry, as curate keeps chunk copies
            seen.write(f"{ctx.section.value}\n")
        runs = ctx.storage.join(ctx.dir, "runs.log")
        count = len(ctx.storage.read_text(runs).splitlines()) if ctx.storage.exists(runs) else 0
        ctx.storage.write_text(runs, "x\n" * (count + 1))
        ctx.storage.write_json(ctx.storage.join(ctx.dir, "out.json"), {"total": total})
        with _store_locked(self.name):
            ctx.tracker.log_metrics({"total": total})
        return {"total": total, "pieces_done": pieces_done}


def standin_stages() -> list[Stage]:
    return [StepStage("a", ()), StepStage("b", ("a",)), StepStage("c", ("b",))]


def make_engine(config: StandinConfig, run_dir: str, storage: Storage | None = None, log=print) -> Engine:
    return Engine(config, standin_stages(), run_dir, storage=storage or Storage(config.storage.s3_options()),
                  version="test", dump_config=dump_config, flat_params=flatten_config, log=log)


if __name__ == "__main__":
    run_dir, uri = sys.argv[1], sys.argv[2]
    cfg = StandinConfig(mlflow=MlflowConfig(tracking_uri=uri))
    result = make_engine(cfg, run_dir).run()
    print(json.dumps({"ran": result.ran, "skipped": result.skipped}), flush=True)
