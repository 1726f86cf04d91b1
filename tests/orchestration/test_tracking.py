"""orchestration.tracking against a real MLflow sqlite store."""
from __future__ import annotations

from orchestration.tracking import Tracking


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
