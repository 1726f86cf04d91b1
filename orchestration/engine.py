"""Run an ordered list of stages over a run directory: fingerprints decide what runs,
markers record what is done, MLflow tracks it, Ray does the heavy work.

fingerprint(stage) = sha256(stage name, format version, its config sections, the
fingerprints of the stages it requires). So a changed train section makes train and
everything after it stale, and leaves curate and shard done. Settings that decide only how
the work runs (actors, batch sizes, retries) are hashed at their defaults, so changing them
makes nothing stale. A stage is also stale when a stage it requires is not done or was
redone since it ran (its success marker records when each of them had finished). A stage
whose fingerprint changed starts over, except for the inner checkpoints it declares reusable
under the changed config (curate's embeddings when only its sampling changed, say).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_curation.storage import Storage
from orchestration.ray_runtime import check_resources, error_line, start_ray, stop_ray
from orchestration.rundir import RunDir, StageStatus, clear_folder
from orchestration.runlock import STALE_S, RunLock, describe, live_holder
from orchestration.stage import Stage, StageContext
from orchestration.tracking import (
    OutageTolerantTracker,
    Tracking,
    default_store_warning,
    git_sha,
    ray_job_id,
    resolve_tracking_uri,
)

CONFIG_FILE = "config.yaml"


class EngineError(RuntimeError):
    """A run that cannot go ahead as asked; one line saying why and what to do."""


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: str):
        super().__init__(f"stage {stage} failed: {error}")
        self.stage, self.error = stage, error


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def config_value(config: Any, path: str) -> Any:
    """The JSON form that the fingerprints hash of a section (``"curate"``) or a value
    (``"run.seed"``) of ``config``: a section's ``fingerprint_view()`` when it has one (one that
    leaves out the settings deciding only how the work runs), else its ``model_dump``."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    if hasattr(value, "fingerprint_view"):
        return value.fingerprint_view()
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


class Engine:
    """The engine for one config and one run directory.

    ``config`` is a pydantic model with ``name``, ``run``, ``ray``, ``mlflow`` and one section
    per stage name; ``dump_config`` turns it into the YAML saved in the run directory and
    ``flat_params`` into MLflow params (secrets masked by the caller).
    """

    def __init__(self, config: Any, stages: list[Stage], run_dir: str, *, storage: Storage, version: str,
                 dump_config: Callable[[Any], str], flat_params: Callable[[Any], dict[str, str]],
                 log: Callable[[str], None] = print):
        names = [s.name for s in stages]
        for stage in stages:
            missing = [r for r in stage.requires if r not in names[: names.index(stage.name)]]
            if missing:
                raise EngineError(f"stage {stage.name} requires {missing} to come before it")
        self.config, self.stages, self.storage, self.version = config, stages, storage, version
        self.rundir = RunDir(run_dir, storage)
        self.dump_config, self.flat_params, self.log = dump_config, flat_params, log
        self.tracking = Tracking(resolve_tracking_uri(config.mlflow.tracking_uri))
        self.fingerprints = self._fingerprints()
        self.reusable = {s.name: self._reusable(s) for s in stages}
        self._lock: RunLock | None = None  # held while run() runs

    # -- fingerprints and status -----------------------------------------------------
    def _fingerprints(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for stage in self.stages:
            sections = {s: config_value(self.config, s) for s in self._scope(stage)}
            out[stage.name] = _digest({"stage": stage.name, "format_version": stage.format_version,
                                       "config": sections, "upstream": {r: out[r] for r in stage.requires}})
        return out

    def _reusable(self, stage: Stage) -> dict[str, str]:
        """The digest of what each reusable path of ``stage`` depends on under this config: the
        values the stage names, its format, and the stages upstream (whose outputs it may read)."""
        upstream = {r: self.fingerprints[r] for r in stage.requires}
        return {path: _digest({"stage": stage.name, "format_version": stage.format_version, "values": values,
                               "upstream": upstream})
                for path, values in stage.reusable(self.config).items()}

    def statuses(self) -> list[StageStatus]:
        run = self.rundir.read_run() or {}
        ids = run.get("mlflow", {}).get("stages", {})
        holder = live_holder(self.storage, self.rundir.uri)
        states: dict[str, str] = {}
        out = []
        for s in self.stages:
            st = self.rundir.status(s.name, self.fingerprints[s.name], (ids.get(s.name) or {}).get("run_id"),
                                    {r: states[r] for r in s.requires}, holder)
            states[s.name] = st.state
            out.append(st)
        return out

    # -- checks before any work ------------------------------------------------------
    def _check_folder(self) -> None:
        uri = self.rundir.uri
        if self.storage.exists(uri) and not self.storage.isdir(uri):
            raise EngineError(f"run directory {uri} is a file, not a folder; give another --run-dir")

    def _check_run(self, force: bool) -> dict[str, Any] | None:
        run = self.rundir.read_run()
        if run and run.get("config_name") != self.config.name and not force:
            raise EngineError(
                f"run directory {self.rundir.uri} was made by config {run.get('config_name')!r}, not "
                f"{self.config.name!r}; use another --run-dir, or --force to redo it with this config")
        return run

    def _select(self, only: str | None, start: str | None) -> list[Stage]:
        names = [s.name for s in self.stages]
        for flag, value in (("--only", only), ("--from", start)):
            if value is not None and value not in names:
                raise EngineError(f"{flag} {value}: no such stage; stages are {', '.join(names)}")
        if only:
            return [s for s in self.stages if s.name == only]
        if start:
            return self.stages[names.index(start):]
        return list(self.stages)

    # -- the run ---------------------------------------------------------------------
    def run(self, *, only: str | None = None, start: str | None = None, force: bool = False) -> RunResult:
        self._check_folder()
        self.tracking.check()
        if warning := default_store_warning(self.config.mlflow.tracking_uri):
            self.log(warning)
        selected = self._select(only, start)
        lock = RunLock(self.storage, self.rundir.uri, self.log)
        if (held := lock.acquire()) is not None:
            raise EngineError(f"run directory {self.rundir.uri} is being run by another process ({describe(held)}); "
                              f"wait for it or stop it first; a run whose machine was lost is taken over "
                              f"{STALE_S / 60:.0f} min after its last heartbeat, or at once if you delete "
                              f"{held['uri']}")
        self._lock = lock
        try:
            return self._run_locked(selected, start, force)
        finally:
            self._lock = None
            lock.release()

    def _run_locked(self, selected: list[Stage], start: str | None, force: bool) -> RunResult:
        run = self._check_run(force)  # read under the lock: a run that just ended may have changed it
        forced = {s.name for s in selected} if (force or start) else set()
        status = {s.name: s for s in self.statuses()}
        todo = [s for s in selected if s.name in forced or status[s.name].state != "done"]
        needed = {r for s in todo for r in s.requires}
        selected_names = {s.name for s in selected}
        for name in needed - selected_names:
            if status[name].state != "done":
                raise EngineError(f"stage {todo[0].name} needs stage {name}, which is {status[name].state}; "
                                  f"run it first (vfm run --from {name})")
        result = RunResult(skipped=[s.name for s in selected if s not in todo])
        for name in result.skipped:
            self.log(f"[{name}] done (fingerprint {self.fingerprints[name]}), skipping")
        if not todo:
            self.log("nothing to do: every selected stage is done")
            return result

        cache_dir = Path(self.config.run.cache_dir).resolve()
        started = start_ray(self.config.ray.address, num_cpus=self.config.ray.num_cpus,
                            num_gpus=self.config.ray.num_gpus, dashboard=self.config.ray.dashboard,
                            object_store_memory_gb=self.config.ray.object_store_memory_gb, cache_dir=cache_dir)
        try:
            check_resources({s.name: s.resources(self.config) for s in todo})
            # Only a config that can run is saved over the run dir's: `vfm resume` reads it back.
            run = self._open_run(run, force)
            parent = self._parent_run(run)
            recorded = run["mlflow"]["stages"]
            # The stages this run does not redo keep their runs, which may sit under an older parent.
            kept = {f"vfm.stage_run.{s.name}": recorded[s.name]["run_id"]
                    for s in self.stages if s not in todo and s.name in recorded}
            self.tracking.tracker(parent).set_tags(kept)
            try:
                for stage in todo:
                    self._check_still_held(f"before stage {stage.name}")
                    result.metrics[stage.name] = self._run_stage(stage, run, parent, cache_dir,
                                                                 fresh=force and stage.name in forced)
                    result.ran.append(stage.name)
            except BaseException as exc:
                state = "killed" if isinstance(exc, KeyboardInterrupt) else "failed"
                if self._lock.lost_to is None:  # else the parent run is the new run's now
                    self._track("mark the pipeline run", self.tracking.finish, parent, state)
                raise
            all_done = all(st.state == "done" for st in self.statuses())
            self._track("finish the pipeline run", self.tracking.finish, parent, "done" if all_done else "partial")
            return result
        finally:
            stop_ray(started)

    def _open_run(self, run: dict[str, Any] | None, force: bool) -> dict[str, Any]:
        if run is None or (force and run.get("config_name") != self.config.name):
            run = {"run_id": uuid.uuid4().hex, "config_name": self.config.name, "created": time.time(),
                   "mlflow": {"tracking_uri": self.tracking.uri, "experiment": None, "parent": None, "stages": {}}}
        run["vfm_version"] = self.version
        self.rundir.write_run(run)
        self.storage.write_text(self.rundir.path(CONFIG_FILE), self.dump_config(self.config))
        return run

    def _experiment_name(self) -> str:
        return self.config.mlflow.experiment or self.config.name

    def _common_tags(self) -> dict[str, str]:
        tags = {"vfm.version": self.version, "vfm.run_dir": self.rundir.uri}
        if sha := git_sha():
            tags["vfm.git_sha"] = sha
        if job := ray_job_id():
            tags["vfm.ray_job_id"] = job
        return tags

    @staticmethod
    def _scope(stage: Stage) -> tuple[str, ...]:
        """The config paths ``stage``'s fingerprint hashes."""
        return (stage.name, *stage.extra_sections)

    def _params(self, scope: list[str] | tuple[str, ...], *, with_unhashed: bool) -> tuple[dict[str, str],
                                                                                           dict[str, str]]:
        """The flattened config split for MLflow: params, the values under ``scope`` that the
        fingerprints hash, which stay the same for the life of a run (MLflow params are write-once);
        and settings, which an attempt of the same run may change: the execution settings under
        ``scope`` and, ``with_unhashed``, every value outside it (ray, mlflow, storage, ...)."""
        keys = getattr(self.config, "execution_keys", None)
        execution = keys() if keys else set()
        params: dict[str, str] = {}
        settings: dict[str, str] = {}
        for key, value in self.flat_params(self.config).items():
            inside = any(key == s or key.startswith(f"{s}.") for s in scope)
            if inside and key not in execution:
                params[key] = value
            elif inside or with_unhashed:
                settings[key] = value
        return params, settings

    def _parent_run(self, run: dict[str, Any]) -> str:
        mlf = run.setdefault("mlflow", {})
        exp_id = self.tracking.experiment(self._experiment_name())
        if mlf.get("experiment") != exp_id:
            mlf.update({"experiment": exp_id, "parent": None, "stages": {}})
        scopes = [scope for s in self.stages for scope in self._scope(s)]
        params, settings = self._params(scopes, with_unhashed=True)
        fingerprint = _digest(self.fingerprints)
        existing = {"run_id": mlf.get("parent"), "fingerprint": mlf.get("parent_fingerprint", fingerprint)}
        parent = self.tracking.parent_run(exp_id, existing, fingerprint, f"{self.config.name}-{run['run_id'][:8]}",
                                          {**self._common_tags(), "vfm.status": "running"}, params, settings)
        mlf.update({"tracking_uri": self.tracking.uri, "parent": parent, "parent_fingerprint": fingerprint})
        self.rundir.write_run(run)
        with tempfile.TemporaryDirectory(prefix="vfm-") as tmp:
            path = Path(tmp, CONFIG_FILE)
            path.write_text(self.dump_config(self.config))
            self.tracking.tracker(parent).log_artifact(path)
        return parent

    def _run_stage(self, stage: Stage, run: dict[str, Any], parent: str, cache_dir: Path,
                   fresh: bool) -> dict[str, float]:
        name, fp = stage.name, self.fingerprints[stage.name]
        stage_cache = cache_dir / run["run_id"][:12] / name
        previous = self.rundir.success(name) or self.rundir.attempt(name) or {}
        reusable = self.reusable[name]
        if fresh or (previous and previous.get("fingerprint") != fp):
            written_under = previous.get("reusable") or {}  # markers older than this key: nothing is kept
            keep = () if fresh else tuple(p for p, d in reusable.items() if written_under.get(p) == d)
            if keep:
                self.log(f"[{name}] its config changed: starting over, but keeping {', '.join(keep)} "
                         f"(made under the same settings)")
            else:
                self.log(f"[{name}] starting from scratch ({'--force' if fresh else 'its config changed'})")
            self.rundir.clear_stage(name, {path: reusable[path] for path in keep}, self._lock.token)
            # Local scratch: copies of the files just cleared go too. A stage keeps its copies of a
            # kept path's files under the same relative path (curate: _work/embeddings), which stay.
            clear_folder(Storage(), str(stage_cache), [path.strip("/") for path in keep])
        else:
            self.rundir.invalidate(name)
        mlf = run["mlflow"]
        params, settings = self._params(self._scope(stage), with_unhashed=False)
        run_id = self.tracking.stage_run(mlf["experiment"], parent, name, mlf["stages"].get(name), fp,
                                         {**self._common_tags(), "vfm.status": "running",
                                          "vfm.output_uri": self.rundir.stage_dir(name)}, params, settings)
        mlf["stages"][name] = {"run_id": run_id, "fingerprint": fp}
        self.rundir.write_run(run)
        self.rundir.mark_attempt(name, fp, reusable, self._lock.token)
        ctx = StageContext(
            name=name, config=self.config, section=getattr(self.config, name), run_dir=self.rundir.uri,
            dir=self.rundir.stage_dir(name), work_dir=self.rundir.work_dir(name),
            cache_dir=stage_cache, storage=self.storage,
            tracker=OutageTolerantTracker(self.tracking.tracker(run_id), self._tracking_warning, name),
            upstream_dirs={r: self.rundir.stage_dir(r) for r in stage.requires})
        ctx.cache_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running (fingerprint {fp}, MLflow run {run_id})")
        t0 = time.monotonic()
        try:
            metrics = stage.run(ctx) or {}
        except KeyboardInterrupt:
            self.rundir.mark_failed(name, fp, "interrupted")
            self._track(f"mark stage {name}'s run", self.tracking.finish, run_id, "killed")
            raise
        except Exception as exc:
            line = error_line(exc)
            self.rundir.mark_failed(name, fp, line)
            self._track(f"mark stage {name}'s run", self.tracking.finish, run_id, "failed")
            raise StageFailed(name, line) from exc
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["stage_seconds"] = time.monotonic() - t0
        self._check_still_held(f"without marking stage {name} done")
        # The work is done: it is marked so before MLflow hears of it, which a tracking outage cannot undo.
        self.rundir.mark_success(name, fp, reusable, metrics, {
            "mlflow_run_id": run_id, "vfm_version": self.version,
            "upstream": self.rundir.upstream_stamps(stage.requires)})
        self._track(f"log stage {name}'s metrics", self.tracking.tracker(run_id).log_metrics, metrics)
        self._track(f"finish stage {name}'s run", self.tracking.finish, run_id, "done")
        self.log(f"[{name}] done in {metrics['stage_seconds']:.1f}s")
        return metrics

    def _check_still_held(self, where: str) -> None:
        """Raise when another run took this run dir over (this one was judged gone): it must
        neither start nor mark done a stage the other may be running."""
        if self._lock is not None and self._lock.lost_to is not None:
            raise EngineError(f"another run took over this run dir ({describe(self._lock.lost_to)}), judging this "
                              f"one gone; stopping {where} so that the two do not overwrite each other")

    def _track(self, what: str, call: Callable[..., Any], *args: Any) -> None:
        """An MLflow call after the work it records (or after a failure, whose error must not be
        hidden by an outage): a failure is one warning line, not the end of the run. (A stage's
        own calls go through OutageTolerantTracker, which lets a wrong call fail the stage.)"""
        try:
            call(*args)
        except Exception as exc:
            self._tracking_warning(what, exc)

    def _tracking_warning(self, what: str, exc: Exception) -> None:
        self.log(f"warning: MLflow ({self.tracking.uri}) could not {what}: {error_line(exc)}")

