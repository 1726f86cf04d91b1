"""Shared fixtures: a real S3 server on loopback, per-test buckets, and a quiet, loopback-only Ray."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def s3_server():
    from tests.s3server import seaweed_server

    with seaweed_server() as server:
        yield server


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
def moto_server():
    """moto's S3 in server mode on loopback, for what SeaweedFS cannot do: archived (Glacier)
    objects, which a GET refuses with InvalidObjectState. Yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def moto_bucket(moto_server):
    """A fresh bucket on the moto server: (boto3 client, bucket name, Storage for it)."""
    import uuid

    import boto3

    from data_curation.storage import Storage

    credentials = {"aws_access_key_id": "moto", "aws_secret_access_key": "moto"}
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **credentials)
    bucket = f"m-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    storage = Storage({"endpoint_url": moto_server, "key": "moto", "secret": "moto"})
    return client, bucket, storage


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
    """A real, new MLflow sqlite store in the test's folder (see tests/mlflow_store.py)."""
    from tests.mlflow_store import new_store

    return new_store(tmp_path)
