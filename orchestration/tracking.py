"""MLflow tracking: one experiment per config name, one parent run per pipeline run, one
nested run per stage. Run ids and the fingerprints they ran under live in run.json, so a
resumed run reattaches to the same runs instead of making new ones, and a run whose config
changed gets new ones. Params (write-once in MLflow) are only the values a fingerprint
hashes; what may change between attempts is kept in ``vfm.setting.*`` tags.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ON_FINISH = {"done": "FINISHED", "partial": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


class TrackingError(RuntimeError):
    """MLflow cannot be used; one line naming the tracking URI."""


def resolve_tracking_uri(configured: str | None) -> str:
    """MLFLOW_TRACKING_URI, else the config's, else sqlite:///mlflow.db in the working directory (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_sha() -> str | None:
    """The commit of the vfm source tree, where it is a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ray_job_id() -> str | None:
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("VFM_RAY_JOB_ID")


def default_store_warning(configured: str | None) -> str | None:
    """A warning line for a Ray job that names no MLflow store (neither MLFLOW_TRACKING_URI nor
    ``configured``): its default, a sqlite file in the job's working directory, is vfm submit's
    staged config folder, deleted with the job, or wherever the Ray head runs; None otherwise."""
    if os.environ.get("MLFLOW_TRACKING_URI") or configured or not ray_job_id():
        return None
    return (f"warning: this Ray job names no MLflow store, so it records to {resolve_tracking_uri(None)} in its "
            f"working directory, which Ray may delete with the job; set MLFLOW_TRACKING_URI (vfm submit passes on "
            f"the submitting shell's) or mlflow.tracking_uri")


class StageTracker:
    """The Tracker a stage sees (orchestration.stage.Tracker), bound to its nested run."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i:i + 100])


# MLflow's error codes for a call that was itself wrong (a bad metric name, a tag key too long):
# a stage making one has a bug, and fails as it would for any other.
_CALLER_ERRORS = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def is_outage(exc: Exception) -> bool:
    """Whether an MLflow call failed for want of the store (locked, down, overloaded, out of
    reach: MLflow's own error for those, or the network's), not because the call was wrong."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _CALLER_ERRORS
    # requests' errors are OSErrors; botocore's are the S3 artifact store's, which are not.
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] == "botocore"


class OutageTolerantTracker:
    """A stage's tracker whose MLflow calls that fail for an outage (:func:`is_outage`) are each
    one line to ``warn(what, exc)``, not the end of the stage: the run directory records what a
    stage did and MLflow only shows it, so a store that is locked or a server that is restarting
    must not undo the work. A wrong call (a bad name, a file that is not there) still raises."""

    def __init__(self, tracker: StageTracker, warn: Callable[[str, Exception], None], stage: str):
        self._tracker, self._warn, self._stage = tracker, warn, stage

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call(f"log stage {self._stage}'s metrics", self._tracker.log_metrics, metrics, step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(local_path).exists():  # the stage's mistake, though an OSError like a network's
            raise FileNotFoundError(f"MLflow artifact {local_path} does not exist")
        self._call(f"log stage {self._stage}'s artifact {Path(local_path).name}", self._tracker.log_artifact,
                   local_path, artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(f"tag stage {self._stage}'s run", self._tracker.set_tags, tags)

    def _call(self, what: str, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._warn(what, exc)


class Tracking:
    def __init__(self, uri: str):
        self.uri = uri
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Schema creation of a new sqlite store logs at INFO on every first use; not news to a user.
            for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
                logging.getLogger(name).setLevel(logging.WARNING)

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def check(self) -> None:
        """Fail fast, before any work, when the store cannot be reached or opened."""
        scheme = self.uri.split("://", 1)[0] if "://" in self.uri else "file"
        if scheme in ("http", "https"):
            try:
                with urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                reason = getattr(exc, "reason", exc)
                raise TrackingError(f"MLflow tracking server {self.uri} is unreachable: {reason}") from None
        elif scheme == "sqlite" and (db := self._sqlite_file()) is not None:
            if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
                raise TrackingError(f"MLflow store {self.uri}: folder {db.parent} does not exist or is not writable")
        elif scheme == "file":
            raise TrackingError(f"MLflow tracking URI {self.uri}: the file store is not supported by MLflow 3; "
                                "use sqlite:///PATH.db or an http(s) server")
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrackingError(f"MLflow tracking URI {self.uri} cannot be used: {line[:300]}") from None

    def experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name, artifact_location=self._artifact_location(name))
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _artifact_location(self, name: str) -> str | None:
        """Where a new experiment's artifacts go: beside a sqlite store's file, in mlruns/NAME,
        the name percent-encoded (MLflow would put them in ./mlruns of the process that first made
        the experiment, which for a Ray job is a temporary working dir, deleted with it); a
        server's own choice else. The folder's path is not resolved through symlinks: another
        node may reach the store by the same link only."""
        db = self._sqlite_file()
        if db is None:
            return None
        folder = urllib.parse.quote(name, safe="")
        folder = "%2E" + folder[1:] if folder.startswith(".") else folder  # "." and ".." are not folders of their own
        return (Path(os.path.abspath(db.parent)) / "mlruns" / folder).as_uri()

    def _sqlite_file(self) -> Path | None:
        """The database file of a sqlite store (relative: to the working directory)."""
        return Path(self.uri.split("sqlite:///", 1)[1]) if self.uri.startswith("sqlite:///") else None

    def _alive(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:
            return False

    def parent_run(self, experiment_id: str, existing: dict[str, Any], fingerprint: str, run_name: str,
                   tags: dict[str, str], params: dict[str, str], settings: dict[str, str]) -> str:
        """The pipeline run: ``existing`` when the store still has it and it ran this config
        (``fingerprint``), else a new parent run; the one it replaces is tagged ``vfm.superseded_by``."""
        return self._run(experiment_id, existing, fingerprint, run_name, tags, params, settings, parent_id=None)

    def stage_run(self, experiment_id: str, parent_id: str, stage: str, existing: dict[str, Any] | None,
                  fingerprint: str, tags: dict[str, str], params: dict[str, str], settings: dict[str, str]) -> str:
        """The stage's nested run: the recorded one when it ran with this fingerprint (moved under
        ``parent_id``, which may be a newer pipeline run), else a new one."""
        return self._run(experiment_id, existing or {}, fingerprint, stage, {**tags, "vfm.fingerprint": fingerprint},
                         params, settings, parent_id=parent_id)

    def _run(self, experiment_id: str, existing: dict[str, Any], fingerprint: str, run_name: str,
             tags: dict[str, str], params: dict[str, str], settings: dict[str, str], parent_id: str | None) -> str:
        """Reattach to or create a run. ``params`` are the values its fingerprint hashes, the same
        for every attempt; ``settings`` (execution settings, cluster and store addresses) may differ
        from one attempt to the next and go to ``vfm.setting.*`` tags, which always hold the latest."""
        if parent_id:
            tags = {**tags, "mlflow.parentRunId": parent_id}
        old = existing.get("run_id")
        if existing.get("fingerprint") == fingerprint and self._alive(old):
            run_id = old
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            if self._alive(old):
                self.client.set_tag(old, "vfm.superseded_by", run_id)
        self._log_new_params(run_id, params)
        StageTracker(self.client, run_id).set_tags(
            {**tags, **{f"vfm.setting.{k}"[:250]: v[:5000] for k, v in settings.items()}})
        return run_id

    def _log_new_params(self, run_id: str, params: dict[str, str]) -> None:
        """MLflow params are write-once: log the keys this run does not have yet (a run dir made
        by an older vfm may lack some)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        items = [Param(k[:250], v[:6000]) for k, v in params.items() if k[:250] not in have]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def tracker(self, run_id: str) -> StageTracker:
        return StageTracker(self.client, run_id)

    def finish(self, run_id: str, state: str) -> None:
        self.client.set_tag(run_id, "vfm.status", state)
        self.client.set_terminated(run_id, status=ON_FINISH.get(state, "FINISHED"))

