"""Clearing a stage folder but for the paths it keeps, on local disk and on the real S3 server."""
from __future__ import annotations

import pytest

from data_curation.storage import Storage
from orchestration.rundir import RunDir
from tests.s3server import storage_at

FILES = ["manifest.parquet", "_SUCCESS.json", "_work/listing/chunk-000000.parquet", "_work/listing/_DONE.json",
         "_work/embeddings/chunk-000000.parquet", "_work/embeddings/chunk-000000.embedding.npy",
         "_work/assign/part.npy", "demo_pool/images/img-000000.png", "demo_pool/labels.parquet",
         "plots/cluster_sizes.png"]


def _stage(storage: Storage, root: str) -> RunDir:
    rundir = RunDir(root, storage)
    for name in FILES:
        storage.write_text(rundir.path("curate", name), name)
    storage.write_text(rundir.path("shard", "index.parquet"), "another stage")
    return rundir


def _left(storage: Storage, rundir: RunDir) -> list[str]:
    prefix = rundir.stage_dir("curate").rstrip("/") + "/"
    return sorted(uri[len(prefix):] for uri in storage.walk_files(rundir.stage_dir("curate")))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_clearing_a_stage_keeps_exactly_the_named_paths(where, tmp_path, request):
    storage, root = storage_at(request, tmp_path, "run", where == "s3")
    rundir = _stage(storage, root)
    kept = {"_work/listing": "d1", "_work/embeddings/": "d2", "demo_pool": "d3", "not/there": "d4"}
    rundir.clear_stage("curate", kept, lock="token")
    assert _left(storage, rundir) == sorted(["_ATTEMPT.json"] + [n for n in FILES if n.startswith((
        "_work/listing/", "_work/embeddings/", "demo_pool/"))])
    marker = rundir.attempt("curate")  # until an attempt begins: no config's, and naming only what was kept
    assert marker["fingerprint"] == "clearing" and marker["reusable"] == kept and marker["lock"] == "token"
    assert storage.read_text(rundir.path("curate", "_work/embeddings/chunk-000000.embedding.npy")) \
        == "_work/embeddings/chunk-000000.embedding.npy"  # untouched, not rewritten
    rundir.clear_stage("curate")
    assert _left(storage, rundir) == []
    assert storage.read_text(rundir.path("shard", "index.parquet")) == "another stage"
