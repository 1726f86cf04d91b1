"""The `vfm` command as a user runs it: real stages, real local Ray, real MLflow sqlite store, real S3."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.curation.images import rgb
from tests.mlflow_store import STORE_FILE, new_store

ROOT = Path(__file__).resolve().parent.parent


def vfm(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default store: cwd
    full_env.update({"PYTHONPATH": str(ROOT), **(env or {})})
    if "MLFLOW_TRACKING_URI" not in full_env and not (cwd / STORE_FILE).exists():
        new_store(cwd)  # what the first run would make there, without MLflow's seconds of migrations
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def status(run_dir: Path | str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    out = vfm("status", str(run_dir), "--json", cwd=cwd, env=env)
    assert out.returncode == 0, out.stderr
    return {s["stage"]: s["state"] for s in json.loads(out.stdout)["stages"]}


def stage_runs(db: Path, experiment: str):
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    return parents, children


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("vfm: error: "), result.stderr
    return lines[0]


# -- bad input: one line, exit 2, nothing lost ------------------------------------------------
def test_config_errors_are_one_line(tmp_path):
    assert "unknown preset 'nope'" in one_error_line(vfm("run", "-c", "nope", cwd=tmp_path))
    assert "config file missing.yaml does not exist" in one_error_line(vfm("run", "-c", "missing.yaml", cwd=tmp_path))
    line = one_error_line(vfm("run", "-c", "smoke", "--set", "shard.bogus=1", cwd=tmp_path))
    assert "unknown key 'shard.bogus'" in line
    line = one_error_line(vfm("run", "-c", "smoke", "--set", "shard.samples_per_shard=many", cwd=tmp_path))
    assert "shard.samples_per_shard" in line
    assert not (tmp_path / "runs").exists()


def test_unreadable_run_dir_is_one_line(tmp_path):
    assert "is not a vfm run directory" in one_error_line(vfm("status", str(tmp_path / "nowhere"), cwd=tmp_path))
    assert "is not a vfm run directory" in one_error_line(vfm("resume", str(tmp_path / "nowhere"), cwd=tmp_path))


def test_s3_endpoint_down_is_one_line(tmp_path):
    line = one_error_line(vfm("run", "-c", "smoke", "--run-dir", "s3://bucket/run", "--set",
                              "storage.endpoint_url=http://127.0.0.1:9", "--set", "storage.key=k", "--set",
                              "storage.secret=s", cwd=tmp_path, timeout=300))
    assert "s3://bucket/run" in line and "EndpointConnectionError" in line


def test_s3_credentials_rejected_is_one_line(tmp_path, s3):
    line = one_error_line(vfm("run", "-c", "smoke", "--run-dir", s3.uri("run"), "--set",
                              f"storage.endpoint_url={s3.endpoint_url}", "--set", f"storage.key={s3.key}",
                              "--set", "storage.secret=wrong", cwd=tmp_path, timeout=300))
    assert s3.uri("run") in line


def test_mlflow_unreachable_fails_fast(tmp_path):
    t0 = time.monotonic()
    line = one_error_line(vfm("run", "-c", "smoke", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}))
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in line
    assert time.monotonic() - t0 < 60 and not (tmp_path / "runs").exists()


def test_ray_cluster_unreachable_is_one_line(tmp_path):
    line = one_error_line(vfm("run", "-c", "smoke", "--address", "127.0.0.1:9", cwd=tmp_path))
    assert "Ray cluster at 127.0.0.1:9 is unreachable" in line


def test_an_embedding_pool_that_would_starve_decoding_is_one_line(tmp_path):
    line = one_error_line(vfm("run", "-c", "smoke", "--set", "ray.num_cpus=2", "--set", "curate.embed.actors=2",
                              cwd=tmp_path))
    assert "stage curate holds 2 CPUs" in line and "curate.embed.actors=2" in line
    assert not (tmp_path / "runs" / "smoke" / "curate").exists()


def test_gpu_embedding_actors_on_a_cpu_cluster_are_one_line(tmp_path):
    line = one_error_line(vfm("run", "-c", "smoke", "--set", "curate.embed.gpus_per_actor=1", cwd=tmp_path))
    assert "stage curate needs 1 CPUs and 1 GPUs in one task" in line and "0 GPUs" in line


def test_gpu_assignment_tasks_on_a_cpu_cluster_are_one_line(tmp_path):
    line = one_error_line(vfm("run", "-c", "smoke", "--set", "curate.cluster.assign_gpus=1", cwd=tmp_path))
    assert "stage curate needs 1 CPUs and 1 GPUs in one task" in line and "curate.cluster.assign_gpus=1)" in line


def test_assignment_tasks_that_reserve_a_gpu_run_and_say_so(tmp_path):
    """Ray gives a task that reserves a GPU CUDA_VISIBLE_DEVICES=0; on this GPU-less machine (a
    declared GPU) faiss-cpu still assigns every kept image."""
    out = vfm("run", "-c", "smoke", "--only", "curate", "--set", "ray.num_gpus=1", "--set",
              "curate.cluster.assign_gpus=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"level-1 assignment: \d+ chunk tasks?, 1 GPU each", out.stdout + out.stderr)
    import pyarrow.parquet as pq

    manifest = pq.read_table(tmp_path / "runs" / "smoke" / "curate" / "manifest.parquet").to_pylist()
    kept = [row for row in manifest if row["dup_kept"]]
    assert kept and all(row["cluster_l1"] is not None and row["cluster_l1"] >= 0 for row in kept)


def test_plan_prints_the_7b_parameter_count(tmp_path):
    out = vfm("plan", "-c", "vit7b", "--json", "--nodes", "4", "--gpus-per-node", "8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parameters"]["backbone"] == 6_716_043_264


def test_presets_lists_the_shipped_presets(tmp_path):
    out = vfm("presets", cwd=tmp_path)
    names = {line.split()[0] for line in out.stdout.splitlines()}
    assert {"local", "smoke", "vit7b", "vit_small", "vit_base", "vit_large"} <= names


def test_building_the_stages_leaves_torch_matplotlib_and_scipy_unimported():
    """`vfm status`, a run with nothing to do and every refusal build the stages without running
    them; the libraries of the work (seconds to import) wait for the work."""
    code = ("import sys; from pipeline.stages import pipeline_stages; pipeline_stages(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'scipy', 'models'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the whole pipeline ------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_pipeline_then_noop_then_only_changed_stage_reruns(tmp_path):
    first = vfm("run", "-c", "smoke", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "smoke"
    assert status(run_dir, tmp_path) == {"curate": "done", "shard": "done", "evaluate": "done"}
    assert (run_dir / "curate" / "manifest.parquet").exists() and (run_dir / "evaluate" / "report.md").exists()
    assert list((run_dir / "shard" / "shards").glob("*.tar"))
    parents, children = stage_runs(tmp_path / "mlflow.db", "smoke")  # the default store: ./mlflow.db
    assert len(parents) == 1 and children == ["curate", "evaluate", "shard"]

    again = vfm("run", "-c", "smoke", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stderr and "running" not in again.stderr
    how = vfm("run", "-c", "smoke", "--set", "curate.embed.batch_size=64", "--set", "shard.upload_attempts=2",
              "--set", "evaluate.threads=1", cwd=tmp_path)  # how the work runs, not what it makes
    assert how.returncode == 0 and "nothing to do" in how.stderr and "running" not in how.stderr

    changed = vfm("run", "-c", "smoke", "--set", "evaluate.knn_k=[5]", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[curate] done" in changed.stderr and "[shard] done" in changed.stderr
    assert "[evaluate] running" in changed.stderr

    other = vfm("run", "-c", "local", "--run-dir", str(run_dir), cwd=tmp_path)
    assert "was made by config 'smoke', not 'local'" in one_error_line(other)
    # nothing was lost: every stage is still done under the run's own saved config
    assert status(run_dir, tmp_path) == {"curate": "done", "shard": "done", "evaluate": "done"}


@pytest.mark.slow
def test_smoke_pipeline_on_an_s3_run_dir_then_a_new_embedder_embeds_again_and_a_new_target_does_not(tmp_path, s3):
    import numpy as np
    import pyarrow.parquet as pq

    run_dir = s3.uri("runs/smoke")
    first = vfm("run", "-c", "smoke", "--run-dir", run_dir, cwd=tmp_path, env=s3.env())
    assert first.returncode == 0, first.stderr[-3000:]
    assert status(run_dir, tmp_path, s3.env()) == {"curate": "done", "shard": "done", "evaluate": "done"}
    assert [u for u in s3.storage.ls(f"{run_dir}/shard/shards") if u.endswith(".tar")]
    assert s3.storage.exists(f"{run_dir}/evaluate/report.md")
    # the demo pool was copied under the run dir, where every node of a cluster can read it
    uris = pq.read_table(io.BytesIO(s3.storage.read_bytes(f"{run_dir}/curate/manifest.parquet"))).column("uri")
    assert all(u.startswith(f"{run_dir}/curate/demo_pool/images/") for u in uris.to_pylist())
    stats = s3.storage.read_json(f"{run_dir}/curate/stats.json")
    assert stats["class_balance_after"] > stats["class_balance_before"] + 0.1  # the hidden classes were found

    def centroid_dim() -> int:
        return np.load(io.BytesIO(s3.storage.read_bytes(f"{run_dir}/curate/clusters/centroids_l1.npy"))).shape[1]

    assert centroid_dim() == 236  # the built-in embedder
    # The embedding chunks were copied to the local cache under the same names; a new embedder
    # must not read them back.
    changed = vfm("run", "-c", "smoke", "--run-dir", run_dir, "--set", "curate.embed.embedder=arch:vit_test",
                  "--set", "curate.embed.image_size=64", cwd=tmp_path, env=s3.env())
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "[curate] its config changed: starting over, but keeping _work/listing, demo_pool" in changed.stderr
    assert centroid_dim() == 64  # vit_test's width
    # Only the sampling changes: the embeddings on S3 are kept and read back, not made again, and the
    # driver's copies of them are kept too, not downloaded again.
    def copies() -> dict:
        return {p: p.stat().st_mtime_ns for p in tmp_path.glob(".cache/vfm/*/curate/_work/embeddings/*/*.npy")}

    before = copies()
    assert before
    resampled = vfm("run", "-c", "smoke", "--run-dir", run_dir, "--only", "curate", "--set",
                    "curate.embed.embedder=arch:vit_test", "--set", "curate.embed.image_size=64", "--set",
                    "curate.sample.target=0.2", cwd=tmp_path, env=s3.env())
    assert resampled.returncode == 0, resampled.stderr[-3000:]
    assert "keeping _work/listing, _work/embeddings, demo_pool" in resampled.stderr
    assert re.search(r"\[curate\] \d+ images in \d+ chunks?; 0 chunks to embed", resampled.stderr)
    assert centroid_dim() == 64
    assert s3.storage.read_json(f"{run_dir}/curate/stats.json")["selected"] < stats["selected"]
    assert copies() == before


@pytest.mark.slow
def test_a_failed_stage_names_the_command_that_resumes_it_and_that_command_finishes_the_run(tmp_path):
    pool, run_dir = tmp_path / "pool", tmp_path / "my runs" / "first"
    pool.mkdir()
    failed = vfm("run", "-c", "smoke", "--run-dir", str(run_dir), "--set", f"curate.sources=['{pool}']",
                 cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("vfm: stage curate failed: ValueError: no images found in curate.sources"), last
    command = re.search(r"fix it and run `([^`]+)` \(finished work is kept\)$", last).group(1)
    assert shlex.split(command) == ["vfm", "resume", str(run_dir)]

    for i in range(40):  # the fix: the folder gets its images
        rgb(seed=i).save(pool / f"{i:02d}.png")
    resumed = vfm(*shlex.split(command)[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[curate] 40 images in 1 chunk; 1 chunk to embed" in resumed.stderr
    assert status(run_dir, tmp_path) == {"curate": "done", "shard": "done", "evaluate": "done"}


@pytest.mark.slow
def test_sigkill_during_a_stage_then_resume(tmp_path):
    run_dir = tmp_path / "runs" / "smoke"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    new_store(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-c", "smoke"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "shard" / "_ATTEMPT.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the shard stage never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = status(run_dir, tmp_path)
    assert states["curate"] == "done" and states["shard"] in ("failed", "done")

    resumed = vfm("resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[curate] done" in resumed.stderr
    assert status(run_dir, tmp_path) == {"curate": "done", "shard": "done", "evaluate": "done"}
    parents, children = stage_runs(tmp_path / "mlflow.db", "smoke")
    assert len(parents) == 1 and children == ["curate", "evaluate", "shard"]
