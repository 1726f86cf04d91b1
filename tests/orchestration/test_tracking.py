"""orchestration.tracking against a real MLflow sqlite store."""
from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from orchestration.tracking import OutageTolerantTracker, Tracking, is_outage
from tests.mlflow_store import new_store


def test_a_sqlite_store_keeps_its_artifacts_beside_its_file(tmp_path, monkeypatch):
    """Not in ./mlruns of whichever process made the experiment first: for `vfm submit` that is
    the Ray job's temporary working dir, deleted with the job."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracking = Tracking(f"sqlite:///{store / 'mlflow.db'}")
    tracking.check()
    experiment = tracking.experiment("a name/with a slash")
    assert tracking.experiment("a name/with a slash") == experiment  # found, not made again
    run_id = tracking.client.create_run(experiment).info.run_id
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"not really a png")
    tracking.tracker(run_id).log_artifact(plot, "plots")
    assert [p.relative_to(store).parts[:2] for p in store.rglob("plot.png")] == [("mlruns", "a%20name%2Fwith%20a%20slash")]
    assert list(elsewhere.iterdir()) == []
    assert [a.path for a in tracking.client.list_artifacts(run_id, "plots")] == ["plots/plot.png"]
    up = tracking.client.get_experiment(tracking.experiment("..")).artifact_location
    assert up == (store / "mlruns" / "%2E.").as_uri()  # a folder of its own, not the store's folder


def test_a_stage_s_wrong_mlflow_call_still_fails_it_and_an_outage_does_not(tmp_path):
    """Only an outage is a warning (the engine's test locks the store while a stage logs); a bad
    name, a tag key too long or an artifact that is not there is the stage's bug."""
    tracking = Tracking(new_store(tmp_path))
    run_id = tracking.client.create_run(tracking.experiment("e")).info.run_id
    warned: list[str] = []
    tracker = OutageTolerantTracker(tracking.tracker(run_id), lambda what, exc: warned.append(what), "s")
    with pytest.raises(MlflowException, match="Invalid value"):
        tracker.log_metrics({"a b!": 1.0})
    with pytest.raises(MlflowException, match="exceeds the maximum length"):
        tracker.set_tags({"k" * 300: "v"})
    with pytest.raises(FileNotFoundError, match="MLflow artifact .*missing.png does not exist"):
        tracker.log_artifact(tmp_path / "missing.png")
    tracker.log_metrics({"fine": 1.0})
    assert warned == [] and tracking.client.get_run(run_id).data.metrics == {"fine": 1.0}
    # The same calls while the store is gone are outages: MLflow's error for them, or the network's.
    assert is_outage(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_outage(requests.ConnectionError("connection refused"))
    assert not is_outage(MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE))
    assert not is_outage(TypeError("a bug of ours"))
