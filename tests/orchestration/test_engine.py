"""The stage engine on stand-in stages: real local Ray, real MLflow sqlite store, real files."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestration import rundir
from orchestration.engine import EngineError, StageFailed
from orchestration.ray_runtime import RayError
from orchestration.runlock import STALE_S, lock_name
from orchestration.tracking import TrackingError
from pipeline.config.core import MlflowConfig, RunConfig
from tests.orchestration.standin import StandinConfig, StepConfig, make_engine

ROOT = Path(__file__).resolve().parents[2]


def runs_of(run_dir: Path, stage: str) -> int:
    path = run_dir / stage / "runs.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cfg(uri: str, **sections) -> StandinConfig:
    return StandinConfig(mlflow=MlflowConfig(tracking_uri=uri), **sections)


def mlflow_runs(uri: str, experiment: str = "standin"):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def test_stages_run_in_order_then_a_rerun_is_a_noop(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    result = make_engine(cfg(mlflow_uri), str(run_dir), log=lines.append).run()
    assert result.ran == ["a", "b", "c"]
    assert json.loads((run_dir / "c" / "out.json").read_text())["total"] == 3
    for stage in "abc":
        marker = json.loads((run_dir / stage / "_SUCCESS.json").read_text())
        assert marker["metrics"]["total"] >= 1
    again = make_engine(cfg(mlflow_uri), str(run_dir)).run()
    assert again.ran == [] and again.skipped == ["a", "b", "c"]
    assert [runs_of(run_dir, s) for s in "abc"] == [1, 1, 1]
    assert (run_dir / "config.yaml").exists() and json.loads((run_dir / "run.json").read_text())["run_id"]


def test_an_mlflow_outage_while_a_stage_logs_is_a_warning_not_a_failed_stage(tmp_path, mlflow_uri, ray_session,
                                                                            monkeypatch):
    # Another process holds the sqlite store's write lock while stage b logs (MLflow gives up after 20 s).
    monkeypatch.setenv("STANDIN_LOCK_MLFLOW", "b:" + mlflow_uri.removeprefix("sqlite:///"))
    lines: list[str] = []
    result = make_engine(cfg(mlflow_uri), str(tmp_path / "run"), log=lines.append).run()
    assert result.ran == ["a", "b", "c"] and (tmp_path / "run" / "b" / "_SUCCESS.json").exists()
    [warning] = [line for line in lines if line.startswith("warning:")]
    assert re.match(r"warning: MLflow \(sqlite:///.*\) could not log stage b's metrics: .*database is locked", warning)
    # The engine's own calls after the work went through: b's run is done and holds its metrics.
    b = next(r for r in mlflow_runs(mlflow_uri) if r.info.run_name == "b")
    assert b.info.status == "FINISHED" and b.data.tags["vfm.status"] == "done" and b.data.metrics["total"] == 2


def test_changed_section_reruns_exactly_that_stage_and_downstream(tmp_path, mlflow_uri, ray_session):
    run_dir, run = tmp_path / "run", RunConfig(cache_dir=str(tmp_path / "cache"))
    make_engine(cfg(mlflow_uri, run=run), str(run_dir)).run()
    engine = make_engine(cfg(mlflow_uri, run=run, b=StepConfig(value=3)), str(run_dir))
    assert [s.state for s in engine.statuses()] == ["done", "stale", "stale"]
    result = engine.run()
    assert result.ran == ["b", "c"] and result.skipped == ["a"]
    assert [runs_of(run_dir, s) for s in "abc"] == [1, 1, 1]  # b, c started from scratch: new folder
    [b_cache] = (tmp_path / "cache").glob("*/b/values.log")
    assert b_cache.read_text() == "3\n"  # and so did b's local cache
    assert json.loads((run_dir / "c" / "out.json").read_text())["total"] == 1 + 9 + 1


def test_a_changed_config_keeps_the_inner_checkpoints_made_under_the_same_settings(tmp_path, mlflow_uri,
                                                                                   ray_session):
    run_dir, run = tmp_path / "run", RunConfig(cache_dir=str(tmp_path / "cache"))
    make_engine(cfg(mlflow_uri, run=run), str(run_dir)).run()
    [b_scratch] = (tmp_path / "cache").glob("*/b")
    (b_scratch / "_work").mkdir()
    (b_scratch / "_work" / "copy.bin").write_text("a local copy of a file of b's _work")  # as curate keeps chunks
    lines: list[str] = []
    result = make_engine(cfg(mlflow_uri, run=run, b=StepConfig(note="n")), str(run_dir), log=lines.append).run()
    assert result.ran == ["b", "c"]
    assert result.metrics["b"]["pieces_done"] == 0  # its pieces depend on nothing that changed
    assert result.metrics["c"]["pieces_done"] == 5  # a stage upstream changed: c keeps nothing
    assert "[b] its config changed: starting over, but keeping _work (made under the same settings)" in lines
    assert "[c] starting from scratch (its config changed)" in lines
    assert [runs_of(run_dir, s) for s in "abc"] == [1, 1, 1]  # the rest of b's folder was cleared
    [b_cache] = (tmp_path / "cache").glob("*/b/values.log")
    assert b_cache.read_text() == "1\n"  # and its local cache, but for the copies of what it kept
    assert (b_scratch / "_work" / "copy.bin").exists()
    noted = cfg(mlflow_uri, run=run, b=StepConfig(value=2, note="n"))
    assert make_engine(noted, str(run_dir)).run().metrics["b"]["pieces_done"] == 5  # a value they depend on
    assert not (b_scratch / "_work").exists()  # _work was not kept: nor are its copies
    marker = run_dir / "b" / "_SUCCESS.json"  # a marker written before vfm recorded what pieces depend on
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "reusable"}))
    renoted = cfg(mlflow_uri, run=run, b=StepConfig(value=2, note="m"))
    assert make_engine(renoted, str(run_dir)).run().metrics["b"]["pieces_done"] == 5
    forced = make_engine(cfg(mlflow_uri, run=run, b=StepConfig(value=2)), str(run_dir)).run(only="b", force=True)
    assert forced.metrics["b"]["pieces_done"] == 5


def test_a_clear_cut_off_part_way_or_before_its_attempt_is_done_again_trusting_only_what_it_kept(
        tmp_path, mlflow_uri, ray_session, monkeypatch):
    run_dir, run = tmp_path / "run", RunConfig(cache_dir=str(tmp_path / "cache"))
    make_engine(cfg(mlflow_uri, run=run), str(run_dir)).run()

    def killed_while_clearing(storage, folder, keep):
        storage.rm(os.path.join(folder, "runs.log"))  # the first of its files gone, then the kill
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # --force, killed while it deletes b's folder
        patch.setattr(rundir, "clear_folder", killed_while_clearing)
        with pytest.raises(KeyboardInterrupt):
            make_engine(cfg(mlflow_uri, run=run), str(run_dir)).run(only="b", force=True)
    engine = make_engine(cfg(mlflow_uri, run=run), str(run_dir))
    assert [(s.state, s.detail.startswith("interrupted")) for s in engine.statuses()][1] == ("failed", True)
    result = engine.run()  # not done with half its folder gone: started again, and from scratch
    assert result.ran == ["b", "c"] and result.metrics["b"]["pieces_done"] == 5 and runs_of(run_dir, "b") == 1

    # A new config that keeps b's pieces, stopped after the clear and before its attempt began (a kill,
    # or MLflow failing); then a config whose pieces differ must not take those pieces for its own.
    noted = make_engine(cfg(mlflow_uri, run=run, b=StepConfig(note="n")), str(run_dir))
    monkeypatch.setattr(noted.tracking, "stage_run", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        noted.run(only="b")
    assert (run_dir / "b" / "_work").is_dir() and not (run_dir / "b" / "_SUCCESS.json").exists()
    result = make_engine(cfg(mlflow_uri, run=run, b=StepConfig(value=2)), str(run_dir)).run()
    assert result.ran == ["b", "c"] and result.metrics["b"]["pieces_done"] == 5


def test_one_parent_and_one_nested_run_per_stage_in_mlflow(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run()
    make_engine(cfg(mlflow_uri), str(run_dir)).run(start="b")
    runs = mlflow_runs(mlflow_uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == ["a", "b", "c"]
    parent = parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert parent.data.params["b.value"] == "1" and parent.data.tags["vfm.status"] == "done"
    child_b = next(r for r in children if r.info.run_name == "b")
    assert child_b.data.metrics["total"] == 2.0 and child_b.data.tags["vfm.fingerprint"]
    assert child_b.data.tags["vfm.output_uri"].endswith("/b")


def test_mlflow_params_are_what_the_fingerprints_hash_and_each_attempt_updates_its_settings(
        tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run()
    [first] = [r for r in mlflow_runs(mlflow_uri) if "mlflow.parentRunId" not in r.data.tags]
    ids = {r.info.run_name: r.info.run_id for r in mlflow_runs(mlflow_uri) if r.info.run_id != first.info.run_id}

    # Another attempt of the same run, with other execution settings and cache: the same runs, new settings.
    moved = RunConfig(cache_dir=str(tmp_path / "elsewhere"))
    make_engine(cfg(mlflow_uri, run=moved, b=StepConfig(workers=4)), str(run_dir)).run(start="b")
    runs = {r.info.run_id: r for r in mlflow_runs(mlflow_uri)}
    assert len(runs) == 4
    parent, b = runs[first.info.run_id], runs[ids["b"]]
    assert parent.data.params["b.value"] == "1" and "b.workers" not in parent.data.params
    assert "run.cache_dir" not in parent.data.params and "ray.num_cpus" not in parent.data.params
    assert parent.data.tags["vfm.setting.b.workers"] == "4"
    assert parent.data.tags["vfm.setting.run.cache_dir"] == str(tmp_path / "elsewhere")
    assert parent.data.tags["vfm.stage_run.a"] == ids["a"]
    assert b.data.params["b.value"] == "1" and "b.workers" not in b.data.params
    assert b.data.tags["vfm.setting.b.workers"] == "4"

    # A changed value is another config: a new parent run, and the old one names it. b keeps its
    # fingerprint, so its run goes on under the new parent; c's is new.
    make_engine(cfg(mlflow_uri, c=StepConfig(value=3)), str(run_dir)).run(start="b")
    runs = {r.info.run_id: r for r in mlflow_runs(mlflow_uri)}
    new_parent = next(r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags
                      and r.info.run_id != first.info.run_id)
    new_c = next(r for r in runs.values() if r.info.run_name == "c" and r.info.run_id != ids["c"])
    assert runs[first.info.run_id].data.tags["vfm.superseded_by"] == new_parent.info.run_id
    assert new_parent.data.params["c.value"] == "3" and new_parent.data.tags["vfm.stage_run.a"] == ids["a"]
    assert runs[ids["b"]].data.tags["mlflow.parentRunId"] == new_parent.info.run_id
    assert new_c.data.tags["mlflow.parentRunId"] == new_parent.info.run_id
    assert runs[ids["c"]].data.tags["vfm.superseded_by"] == new_c.info.run_id
    assert runs[ids["a"]].data.tags["mlflow.parentRunId"] == first.info.run_id
    assert new_parent.data.tags["vfm.setting.b.workers"] == "1"


def test_only_from_and_force(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    with pytest.raises(EngineError, match="needs stage a, which is pending"):
        make_engine(cfg(mlflow_uri), str(run_dir)).run(only="b")
    make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a")
    assert runs_of(run_dir, "a") == 1 and runs_of(run_dir, "b") == 0
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run(start="b").ran == ["b", "c"]
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run(start="c").ran == ["c"]
    assert runs_of(run_dir, "c") == 2  # --from reran c from its inner checkpoints, keeping its folder
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run(only="c", force=True).ran == ["c"]
    assert runs_of(run_dir, "c") == 1  # --force started it from scratch
    with pytest.raises(EngineError, match="--only nope: no such stage"):
        make_engine(cfg(mlflow_uri), str(run_dir)).run(only="nope")


def test_failed_stage_is_marked_and_resume_continues(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed, match="^stage b failed: ValueError: b was told to fail$"):  # the task's error
        make_engine(cfg(mlflow_uri, b=StepConfig(fail=True)), str(run_dir)).run()
    engine = make_engine(cfg(mlflow_uri, b=StepConfig(fail=True)), str(run_dir))
    assert [s.state for s in engine.statuses()] == ["done", "failed", "pending"]
    assert engine.statuses()[1].detail == "ValueError: b was told to fail"
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run().ran == ["b", "c"]


def test_a_stage_redone_alone_makes_the_stages_after_it_stale(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run()
    make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a", force=True)  # new outputs, same fingerprint
    statuses = make_engine(cfg(mlflow_uri), str(run_dir)).statuses()
    assert [s.state for s in statuses] == ["done", "stale", "stale"]
    assert statuses[1].detail == "stage a before it was redone since it ran"
    assert statuses[2].detail == "stage b before it is stale"
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run().ran == ["b", "c"]
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run().ran == []


def test_a_run_that_leaves_stages_to_do_ends_its_mlflow_parent_as_partial(tmp_path, mlflow_uri, ray_session):
    make_engine(cfg(mlflow_uri), str(tmp_path / "run")).run(only="a")
    [parent] = [r for r in mlflow_runs(mlflow_uri) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["vfm.status"] == "partial"


def test_a_run_dir_given_as_a_file_uri_or_that_is_a_file(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), f"file://{run_dir}").run(only="a")
    assert (run_dir / "a" / "_SUCCESS.json").exists() and (run_dir / "run.json").exists()
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a").ran == []  # the same run dir
    with pytest.raises(EngineError, match=rf"run directory {run_dir / 'config.yaml'} is a file, not a folder"):
        make_engine(cfg(mlflow_uri), str(run_dir / "config.yaml")).run()


def test_a_run_on_another_machine_holds_the_run_dir_until_its_heartbeat_stops(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a")
    attempt = run_dir / "b" / "_ATTEMPT.json"  # stage b, started by that machine
    attempt.parent.mkdir()
    attempt.write_text(json.dumps({"fingerprint": "x", "pid": 4242, "host": "ray-head-lost", "started": time.time(),
                                   "lock": "theirs"}))
    lock = run_dir / lock_name(1)
    held = {"token": "theirs", "pid": 4242, "host": "ray-head-lost", "started": time.time() - 60,
            "heartbeat": time.time() - 5}
    lock.write_text(json.dumps(held))
    statuses = make_engine(cfg(mlflow_uri), str(run_dir)).statuses()
    assert statuses[1].state == "running" and statuses[1].detail.startswith("pid 4242 on ray-head-lost, since ")
    with pytest.raises(EngineError, match=rf"^run directory {run_dir} is being run by another process \(pid 4242 on "
                                          rf"ray-head-lost, since .*, heartbeat 5 s ago\); wait for it or stop it "
                                          rf"first; .* taken over 5 min after its last heartbeat, or at once if you "
                                          rf"delete {lock}$"):
        make_engine(cfg(mlflow_uri), str(run_dir)).run()
    assert json.loads(lock.read_text())["token"] == "theirs"  # not touched
    lock.write_text(json.dumps({**held, "heartbeat": time.time() - STALE_S - 1}))  # that machine was lost
    statuses = make_engine(cfg(mlflow_uri), str(run_dir)).statuses()
    assert statuses[1].state == "failed" and "interrupted" in statuses[1].detail
    lines = []
    assert make_engine(cfg(mlflow_uri), str(run_dir), log=lines.append).run().ran == ["b", "c"]
    assert any(re.fullmatch(r"taking over the run dir from a run that is gone \(pid 4242 on ray-head-lost, .*: "
                            r"no heartbeat for 30\d s\)", line) for line in lines), lines
    assert [p.name for p in run_dir.glob("_LOCK-*")] == [lock_name(2)]  # the stale one removed
    assert json.loads((run_dir / lock_name(2)).read_text())["released"]  # let go at the end, kept


def test_a_second_run_on_a_busy_run_dir_is_refused_and_takes_nothing_away(tmp_path, mlflow_uri, ray_session):
    """Two `vfm run`s on one run dir started seconds apart used to both run every stage."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.orchestration.standin", str(run_dir), mlflow_uri]
    first = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "STANDIN_SLEEP": "0.5"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("_LOCK-*.json")):
            assert first.poll() is None, first.stdout.read().decode()
            assert time.monotonic() < deadline, "the first run never claimed the run dir"
            time.sleep(0.1)
        with pytest.raises(EngineError, match=rf"is being run by another process \(pid {first.pid} on "):
            make_engine(cfg(mlflow_uri), str(run_dir)).run()
        assert first.wait(timeout=300) == 0, first.stdout.read().decode()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert [runs_of(run_dir, s) for s in "abc"] == [1, 1, 1]  # each stage ran once, by the first run
    assert make_engine(cfg(mlflow_uri), str(run_dir)).run().ran == []


def test_a_config_the_cluster_cannot_run_is_not_saved_over_the_run_dirs(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a")
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(RayError, match="stage b holds 64 CPUs"):
        make_engine(cfg(mlflow_uri, b=StepConfig(held_cpus=64)), str(run_dir)).run()
    assert (run_dir / "config.yaml").read_text() == saved  # what `vfm resume` reads is still the config that ran


def test_run_dir_of_another_config_is_refused_unless_forced(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    make_engine(cfg(mlflow_uri), str(run_dir)).run(only="a")
    other = cfg(mlflow_uri).model_copy(update={"name": "other"})
    with pytest.raises(EngineError, match="made by config 'standin', not 'other'"):
        make_engine(other, str(run_dir)).run()
    assert runs_of(run_dir, "a") == 1  # nothing lost
    assert make_engine(other, str(run_dir)).run(force=True).ran == ["a", "b", "c"]


def test_unreachable_mlflow_fails_before_any_work(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    with pytest.raises(TrackingError, match="http://127.0.0.1:9 is unreachable"):
        make_engine(cfg("http://127.0.0.1:9"), str(run_dir)).run()
    assert not run_dir.exists()


def test_stage_asking_more_than_the_cluster_has_is_refused(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    with pytest.raises(RayError, match="stage b needs 1 CPUs and 4 GPUs in one task.*has 2 CPUs and 0 GPUs"):
        make_engine(cfg(mlflow_uri, b=StepConfig(gpus=4)), str(run_dir)).run()


def test_a_pool_that_leaves_no_cpu_for_its_tasks_is_refused_before_any_work(tmp_path, mlflow_uri, ray_session):
    run_dir = tmp_path / "run"
    with pytest.raises(RayError, match=r"stage c holds 2 CPUs .*\(c.held_cpus\) and needs at least 1 more CPU"):
        make_engine(cfg(mlflow_uri, c=StepConfig(held_cpus=2)), str(run_dir)).run()
    assert runs_of(run_dir, "a") == 0
    assert make_engine(cfg(mlflow_uri, c=StepConfig(held_cpus=1)), str(run_dir)).run().ran == ["a", "b", "c"]


def test_unreachable_ray_cluster_is_one_clear_error(tmp_path, mlflow_uri):
    c = cfg(mlflow_uri)
    c.ray.address = "127.0.0.1:9"
    with pytest.raises(RayError, match="Ray cluster at 127.0.0.1:9 is unreachable"):
        make_engine(c, str(tmp_path / "run")).run()


def test_run_dir_on_s3(s3, mlflow_uri, ray_session):
    c = cfg(mlflow_uri)
    c.storage.endpoint_url, c.storage.key, c.storage.secret = s3.endpoint_url, s3.key, s3.secret
    run_dir = s3.uri("runs/one")
    assert make_engine(c, run_dir).run().ran == ["a", "b", "c"]
    assert s3.storage.read_json(s3.uri("runs/one/c/out.json"))["total"] == 3
    assert s3.storage.exists(s3.uri("runs/one/b/_SUCCESS.json"))
    assert "secret: '***'" in s3.storage.read_text(s3.uri("runs/one/config.yaml"))
    assert make_engine(c, run_dir).run().skipped == ["a", "b", "c"]


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_reattaches_mlflow_runs(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.orchestration.standin", str(run_dir), mlflow_uri]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**env, "STANDIN_SLEEP": "1.0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (run_dir / "b" / "_work" / "piece-1.json").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "stage b never got going"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    engine = make_engine(cfg(mlflow_uri), str(run_dir))
    states = [s.state for s in engine.statuses()]
    assert states[0] == "done" and states[1] == "failed" and "interrupted" in engine.statuses()[1].detail
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"ran": ["b", "c"], "skipped": ["a"]}
    marker = json.loads((run_dir / "b" / "_SUCCESS.json").read_text())
    assert marker["metrics"]["pieces_done"] < 5  # the pieces finished before the kill were kept
    runs = mlflow_runs(mlflow_uri)
    assert sum("mlflow.parentRunId" not in r.data.tags for r in runs) == 1
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags) == ["a", "b", "c"]


def test_a_ray_job_that_names_no_mlflow_store_is_warned(tmp_path, mlflow_uri, ray_session, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_test")
    monkeypatch.chdir(tmp_path)  # the job's working directory, where the default store goes
    lines: list[str] = []
    make_engine(cfg(None), str(tmp_path / "run"), log=lines.append).run(only="a")
    assert [line for line in lines if line.startswith("warning: ")] == [
        f"warning: this Ray job names no MLflow store, so it records to sqlite:///{tmp_path / 'mlflow.db'} in its "
        f"working directory, which Ray may delete with the job; set MLFLOW_TRACKING_URI (vfm submit passes on the "
        f"submitting shell's) or mlflow.tracking_uri"]
    named: list[str] = []
    make_engine(cfg(mlflow_uri), str(tmp_path / "named"), log=named.append).run(only="a")
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID")
    make_engine(cfg(None), str(tmp_path / "local"), log=named.append).run(only="a")  # not a Ray job: no warning
    assert not [line for line in named if line.startswith("warning: ")]
