"""`vfm submit` and plain `ray job submit -- vfm run ...` against a real `ray start --head` on loopback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A Ray head started the way an operator secures one (a token from `ray get-auth-token
    --generate`, RAY_AUTH_MODE=token), stopped by killing its process group. HOME is a temporary
    folder for the head and the test's clients, so the token (HOME/.ray/auth_token) neither
    comes from nor stays behind in the user's home."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    gcs, dash = free_port(), free_port()
    # Every port Ray would otherwise take by default, so this head can live beside another local Ray.
    agent_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "object-manager-port", "node-manager-port")]
    temp = tempfile.mkdtemp(prefix="vfmhead-", dir="/tmp")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                   timeout=120)
    env["RAY_AUTH_MODE"] = "token"
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp}",
                             "--include-dashboard=true", *agent_ports], cwd=home, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:  # 401: up, with Ray's token auth (clients here read HOME/.ray/auth_token)
            break
        except OSError:
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard never came up"
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGKILL)  # the whole head (GCS, raylet, dashboard, workers) is this group
    proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_follow_then_plain_ray_job_submit(tmp_path, ray_head, mlflow_uri):
    config = tmp_path / "cluster.yaml"
    config.write_text("base: smoke\nname: cluster\n")
    run_dir = tmp_path / "run"
    db = tmp_path / "mlflow.db"  # mlflow_uri's
    # `ray start --head` turns on Ray's token auth; a client sends the token from HOME/.ray/auth_token in token mode
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "--address", ray_head, "--follow",
                          "-c", str(config), "--run-dir", str(run_dir)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job_id = out.stdout.splitlines()[0].strip()
    assert job_id.startswith("vfm-") and "SUCCEEDED" in out.stderr
    assert "[evaluate] done" in out.stdout  # the job's own log lines, streamed
    for stage in ("curate", "shard", "evaluate"):
        assert json.loads((run_dir / stage / "_SUCCESS.json").read_text())["fingerprint"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cluster")
    parent = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].data.tags["vfm.ray_job_id"] == job_id
    (evaluate,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "evaluate"]

    # A plain job gets the head's environment, not this client's: the store travels in its runtime env.
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}})
    plain = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_head, "--runtime-env-json",
                            runtime_env, "--", "vfm", "run", "-c", str(config), "--run-dir", str(run_dir),
                            "--from", "evaluate"], cwd=tmp_path,
                           env={**env, "PATH": f"{BIN}:{os.environ['PATH']}"}, capture_output=True, text=True,
                           timeout=900)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert "[evaluate] running" in plain.stdout + plain.stderr and "succeeded" in (plain.stdout + plain.stderr)
    # The same run dir and config: the plain job reattached to the same runs, in the store its runtime env named.
    (evaluate_again,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "evaluate"]
    assert evaluate_again.info.run_id == evaluate.info.run_id
    assert evaluate_again.info.end_time > evaluate.info.end_time
