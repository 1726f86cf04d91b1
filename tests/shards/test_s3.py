"""Shards on a real S3 server (SeaweedFS on 127.0.0.1): build, verify, read, and the server going down."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
import webdataset as wds

from data_curation.shards.build import ShardSpec, build_shards
from data_curation.shards.gopen import register_gopen
from data_curation.shards.index import read_index, read_shard_list
from data_curation.shards.plan import ShardLimits
from data_curation.shards.reader import ShardDataset
from data_curation.shards.verify import verify_shards
from data_curation.shards.writer import RetryPolicy, ShardUploadError
from data_curation.storage import Storage

SPEC = ShardSpec(prefix="s3t", limits=ShardLimits(samples=40, max_bytes=1 << 20, seed=1), shards_per_task=2)
QUIET = {"log": lambda _: None}


class FailingUploads(Storage):
    """The real server's Storage that takes the server down just before upload number ``at``.

    botocore's own retries are off, so that the shard writer's retries are what is tested.
    """

    def __init__(self, options: dict, at: int, on_fail):
        super().__init__({**options, "config_kwargs": {"retries": {"max_attempts": 1}}})
        self.at, self.on_fail, self.uploads = at, on_fail, 0

    def put_file(self, local_path, uri):
        self.uploads += 1
        if self.uploads == self.at:
            self.on_fail()
        return super().put_file(local_path, uri)


def _every_sample_once(shard_dir: str, storage: Storage, expected: set[str]) -> None:
    keys = Counter()
    for rank in range(2):
        dataset = ShardDataset(shard_dir, storage, rank=rank, world_size=2, batch_size=4, shuffle_block=8,
                               decode=False)
        for worker in range(2):
            keys.update(s["__key__"] for s in dataset.stream(worker, 2))
    assert keys == Counter(expected)


def test_build_verify_and_read_on_s3(pool, s3):
    shard_dir = s3.uri("run/shard")
    result = build_shards(pool.manifest_uri, shard_dir, s3.uri("run/work"), SPEC, s3.storage, **QUIET)
    assert result.samples == len(pool.selected) and result.written == len(result.records) == 5
    assert verify_shards(shard_dir, s3.storage).ok
    _every_sample_once(shard_dir, s3.storage, pool.selected)

    full = list(ShardDataset(shard_dir, s3.storage, seed=2, shuffle_block=8, decode=False))
    tail = list(ShardDataset(shard_dir, s3.storage, seed=2, shuffle_block=8, decode=False, start=77))
    assert [s["__key__"] for s in tail] == [s["__key__"] for s in full[77:]]

    register_gopen(s3.storage)
    first = read_shard_list(shard_dir, s3.storage)[0]
    plain = [s["__key__"] for s in wds.WebDataset(first["uri"], shardshuffle=False)]
    assert plain == read_index(shard_dir, s3.storage)["key"].to_pylist()[:first["nsamples"]]

    again = build_shards(pool.manifest_uri, shard_dir, s3.uri("run/work"), SPEC, s3.storage, **QUIET)
    assert (again.kept, again.written) == (5, 0)

    name = first["url"].rsplit("/", 1)[-1]
    data = bytearray(s3.storage.read_bytes(first["uri"]))
    data[1000] ^= 0x04
    s3.storage.write_bytes(first["uri"], bytes(data))
    assert set(verify_shards(shard_dir, s3.storage).bad) == {name}


@pytest.mark.slow
def test_server_down_mid_upload_and_back_is_retried(pool, s3):
    restart = threading.Timer(0.5, s3.start)
    storage = FailingUploads(s3.storage_options(), at=3, on_fail=lambda: (s3.stop(), restart.start()))
    spec = ShardSpec(**{**SPEC.__dict__, "retry": RetryPolicy(attempts=6, backoff_s=1.0)})
    shard_dir = s3.uri("run/shard")
    try:
        result = build_shards(pool.manifest_uri, shard_dir, s3.uri("run/work"), spec, storage, **QUIET)
    finally:
        restart.join()
    assert storage.uploads > len(result.records) == 5
    assert verify_shards(shard_dir, s3.storage).ok
    _every_sample_once(shard_dir, s3.storage, pool.selected)


@pytest.mark.slow
def test_server_down_is_one_clear_error_and_a_rerun_completes(pool, s3):
    storage = FailingUploads(s3.storage_options(), at=3, on_fail=s3.stop)
    spec = ShardSpec(**{**SPEC.__dict__, "retry": RetryPolicy(attempts=2, backoff_s=0.1)})
    shard_dir = s3.uri("run/shard")
    with pytest.raises(ShardUploadError, match=r"shard s3t-000002\.tar: upload to s3://.* failed after 2 attempts"):
        build_shards(pool.manifest_uri, shard_dir, s3.uri("run/work"), spec, storage, **QUIET)
    s3.start()
    rerun = build_shards(pool.manifest_uri, shard_dir, s3.uri("run/work"), spec, s3.storage, **QUIET)
    assert (rerun.kept, rerun.written) == (2, 3)
    assert verify_shards(shard_dir, s3.storage).ok
    _every_sample_once(shard_dir, s3.storage, pool.selected)
