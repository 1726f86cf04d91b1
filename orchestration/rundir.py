"""The run directory: run.json, config.yaml and each stage's folder with its markers.

Markers in a stage folder:
- ``_ATTEMPT.json``: written when an attempt starts (fingerprint, pid, host, time), and before
  a stage is cleared, with the fingerprint ``clearing`` (no config's) and the kept paths only;
- ``_FAILED.json``: written when an attempt raises (the error line);
- ``_SUCCESS.json``: written last and atomically when the stage finished, with its fingerprint
  and headline metrics. Only this one makes a stage done, and only with the current fingerprint.
"""
from __future__ import annotations

import os
import posixpath
import socket
import time
from dataclasses import dataclass
from typing import Any

from data_curation.storage import Storage
from orchestration.runlock import describe

SUCCESS, ATTEMPT, FAILED = "_SUCCESS.json", "_ATTEMPT.json", "_FAILED.json"
MARKERS = (SUCCESS, ATTEMPT, FAILED)
CLEARING = "clearing"  # the fingerprint of the attempt marker of a stage being cleared: no config's
STATES = ("done", "pending", "running", "failed", "stale")


def clear_folder(storage: Storage, folder: str, keep: list[str]) -> None:
    """Remove everything in ``folder`` (a URI, local or remote) but the paths ``keep``, relative
    to it; only the folders above a kept path are opened."""
    if not keep:
        storage.rm(folder, recursive=True)
        return
    for uri in storage.ls(folder):
        entry = posixpath.basename(uri.rstrip("/"))
        if entry in keep:
            continue
        inside = [k.split("/", 1)[1] for k in keep if k.startswith(f"{entry}/")]
        if inside:
            clear_folder(storage, uri, inside)
        else:
            storage.rm(uri, recursive=True)


@dataclass
class StageStatus:
    name: str
    state: str  # one of STATES
    fingerprint: str  # the current one, from the config
    recorded_fingerprint: str | None  # the one in _SUCCESS.json, if any
    mlflow_run_id: str | None
    metrics: dict[str, float]
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.name, "state": self.state, "fingerprint": self.fingerprint,
                "recorded_fingerprint": self.recorded_fingerprint, "mlflow_run_id": self.mlflow_run_id,
                "metrics": self.metrics, "detail": self.detail}


class RunDir:
    def __init__(self, uri: str, storage: Storage):
        uri = uri.removeprefix("file://")  # a local folder, however it is written
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(uri)
        self.storage = storage

    def path(self, *parts: str) -> str:
        return self.storage.join(self.uri, *parts)

    def stage_dir(self, name: str) -> str:
        return self.path(name)

    def work_dir(self, name: str) -> str:
        return self.path(name, "_work")

    # -- run.json --------------------------------------------------------------------
    def read_run(self) -> dict[str, Any] | None:
        uri = self.path("run.json")
        return self.storage.read_json(uri) if self.storage.exists(uri) else None

    def write_run(self, run: dict[str, Any]) -> None:
        self.storage.write_json(self.path("run.json"), run)

    # -- markers ---------------------------------------------------------------------
    def _marker(self, name: str, marker: str) -> dict[str, Any] | None:
        uri = self.path(name, marker)
        try:
            return self.storage.read_json(uri)
        except FileNotFoundError:
            return None

    def success(self, name: str) -> dict[str, Any] | None:
        return self._marker(name, SUCCESS)

    def attempt(self, name: str) -> dict[str, Any] | None:
        return self._marker(name, ATTEMPT)

    def mark_attempt(self, name: str, fingerprint: str, reusable: dict[str, str], lock: str) -> None:
        """``reusable``: the digest of what each reusable path of the stage was written under;
        ``lock``: the token of the run lock the attempt runs under."""
        self.storage.rm(self.path(name, FAILED))
        self.storage.write_json(self.path(name, ATTEMPT), {
            "fingerprint": fingerprint, "reusable": reusable, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.time(), "lock": lock})

    def mark_failed(self, name: str, fingerprint: str, error: str) -> None:
        self.storage.write_json(self.path(name, FAILED), {
            "fingerprint": fingerprint, "error": error, "failed": time.time()})

    def mark_success(self, name: str, fingerprint: str, reusable: dict[str, str], metrics: dict[str, float],
                     extra: dict[str, Any]) -> None:
        self.storage.write_json(self.path(name, SUCCESS), {
            "fingerprint": fingerprint, "reusable": reusable, "metrics": metrics, "finished": time.time(), **extra})
        self.storage.rm(self.path(name, ATTEMPT))

    def clear_stage(self, name: str, keep: dict[str, str] | None = None, lock: str = "") -> None:
        """Forget a stage (--force, a changed config): its outputs, inner checkpoints and
        markers, all but the paths in ``keep`` (relative to the stage's folder, each with the
        digest of what it was written under). ``lock``: the token of the run lock the clear runs
        under.

        First the stage's markers become one attempt marker of fingerprint :data:`CLEARING`
        that records only the kept paths: a clear cut off part way, or a run stopped after it
        and before its attempt began, leaves a stage that no config takes for done, and the next
        run (whatever its config) clears it again, trusting nothing but those paths. Without
        anything to keep, that marker goes last, once the rest is gone."""
        keep = dict(keep or {})
        self.mark_attempt(name, CLEARING, keep, lock)
        self.storage.rm(self.path(name, SUCCESS))
        clear_folder(self.storage, self.stage_dir(name), [k.strip("/") for k in keep] + list(MARKERS))
        if not keep:
            self.storage.rm(self.path(name, ATTEMPT))
            self.storage.rm(self.stage_dir(name), recursive=True)  # the folder itself, and what came since

    def invalidate(self, name: str) -> None:
        """Remove only the success marker, so the stage is redone from its inner checkpoints."""
        self.storage.rm(self.path(name, SUCCESS))

    def upstream_stamps(self, requires: tuple[str, ...]) -> dict[str, float | None]:
        """When each stage in ``requires`` last finished: what a stage that reads their outputs
        records in its success marker, to tell later that one of them was redone since."""
        return {r: (self.success(r) or {}).get("finished") for r in requires}

    def status(self, name: str, fingerprint: str, mlflow_run_id: str | None,
               upstream: dict[str, str] | None = None, holder: dict[str, Any] | None = None) -> StageStatus:
        """``upstream``: the states of the stages it requires, by name. A stage is done when its
        success marker has the current fingerprint, every stage it requires is done, and none of
        them finished again since it ran (``vfm run --only curate --force`` makes shard stale).
        ``holder``: the live run lock (runlock.live_holder), if any: an attempt made under
        another lock was interrupted."""
        upstream = upstream or {}
        ok = self.success(name)
        recorded = ok.get("fingerprint") if ok else None
        metrics = ok.get("metrics", {}) if ok else {}
        if ok and recorded == fingerprint:
            not_done = [r for r, state in upstream.items() if state != "done"]
            consumed = ok.get("upstream")  # absent in markers of older versions: nothing to compare
            redone = [] if not_done or consumed is None else [
                r for r, stamp in self.upstream_stamps(tuple(upstream)).items() if consumed.get(r) != stamp]
            if not not_done and not redone:
                return StageStatus(name, "done", fingerprint, recorded, mlflow_run_id, metrics)
            why = (f"stage {not_done[0]} before it is {upstream[not_done[0]]}" if not_done
                   else f"stage {redone[0]} before it was redone since it ran")
            return StageStatus(name, "stale", fingerprint, recorded, mlflow_run_id, metrics, why)
        failed = self._marker(name, FAILED)
        attempt = self._marker(name, ATTEMPT)
        if attempt and not (failed and failed.get("failed", 0) >= attempt.get("started", 0)):
            if holder is not None and holder.get("token") and attempt.get("lock") == holder.get("token"):
                return StageStatus(name, "running", fingerprint, recorded, mlflow_run_id, metrics, describe(holder))
            return StageStatus(name, "failed", fingerprint, recorded, mlflow_run_id, metrics,
                               f"interrupted (process {attempt.get('pid')} on {attempt.get('host')} no longer "
                               f"holds the run dir)")
        if failed:
            return StageStatus(name, "failed", fingerprint, recorded, mlflow_run_id, metrics, failed.get("error", ""))
        if ok:
            return StageStatus(name, "stale", fingerprint, recorded, mlflow_run_id, metrics,
                               "config or an upstream stage changed since it ran")
        return StageStatus(name, "pending", fingerprint, recorded, mlflow_run_id, metrics)
