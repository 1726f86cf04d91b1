"""Shared fixtures: a real S3 server on loopback, per-test buckets, and a quiet, loopback-only Ray."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def s3_server():
    from tests.s3server import SeaweedS3

    root = Path(tempfile.mkdtemp(prefix="vfm-s3-"))
    server = SeaweedS3(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3(s3_server):
    """A fresh empty bucket on the real SeaweedFS server (see tests/s3server.py)."""
    from tests.s3server import S3Bucket

    if s3_server.proc is None:  # a previous test stopped it and failed before restarting it
        s3_server.start()
    bucket = S3Bucket(s3_server)
    yield bucket
    if s3_server.proc is None:
        s3_server.start()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session, on loopback; the engine reuses it instead of starting its own."""
    import ray

    from orchestration.ray_runtime import ray_temp_dir

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=ray_temp_dir(tmp_path_factory.mktemp("raycache")), logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A real MLflow sqlite store in the test's folder."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
