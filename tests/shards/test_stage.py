"""The shard stage on a real local Ray: shards written by Ray tasks, a rerun keeps them."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from data_curation.shards.reader import ShardDataset
from data_curation.shards.verify import verify_shards
from data_curation.shards.writer import ShardUploadError
from data_curation.storage import Storage
from orchestration.stage import StageContext
from pipeline.config.shard import ShardConfig
from pipeline.stages.shard import ShardStage, ray_run_all
from tests.memory_tracker import MemoryTracker


@pytest.fixture(autouse=True)
def local_ray(ray_session):
    """The session's one local Ray (tests/conftest.py)."""
    return ray_session


def _context(run_dir: Path, curate_dir: str, section: ShardConfig) -> StageContext:
    return StageContext(name="shard", config=None, section=section, run_dir=str(run_dir),
                        dir=str(run_dir / "shard"), work_dir=str(run_dir / ".work" / "shard"),
                        cache_dir=run_dir / ".cache", storage=Storage(), tracker=MemoryTracker(),
                        upstream_dirs={"curate": curate_dir})


def test_stage_writes_shards_with_ray_and_a_rerun_keeps_them(pool, tmp_path, capsys):
    section = ShardConfig(name="vfm", samples_per_shard=25, shards_per_task=3)
    curate_dir = str(Path(pool.manifest_uri).parent)
    ctx = _context(tmp_path, curate_dir, section)
    metrics = ShardStage().run(ctx)
    assert metrics["samples"] == len(pool.selected) and metrics["shards"] == 8 == metrics["shards_rewritten"]
    shard_dir = Path(ctx.dir)
    assert sorted(p.name for p in (shard_dir / "shards").iterdir()) == [f"vfm-{i:06d}.tar" for i in range(8)]
    assert {"index.parquet", "shards.json", "stats.json"} <= {p.name for p in shard_dir.iterdir()}
    assert ctx.tracker.tags["shards_uri"] == str(shard_dir / "shards")
    assert verify_shards(ctx.dir).ok
    assert {s["__key__"] for s in ShardDataset(ctx.dir, decode=False)} == pool.selected

    again = ShardStage().run(_context(tmp_path, curate_dir, section))
    assert (again["shards_kept"], again["shards_rewritten"]) == (8, 0)
    assert "8 kept, 0 rewritten" in capsys.readouterr().err
    assert json.loads((shard_dir / "stats.json").read_text())["shards_kept"] == 8


def test_config_rejects_unknown_keys_and_bad_names():
    with pytest.raises(ValueError, match="samples_per_shrd"):
        ShardConfig(samples_per_shrd=3)
    with pytest.raises(ValueError, match="name"):
        ShardConfig(name="a/b")


def _upload_or_linger(i: int) -> int:
    """Task 0 fails as an upload does after its retries; the others would run a minute."""
    import time

    if i == 0:
        time.sleep(1.0)  # the others have started
        raise ShardUploadError("could not put shard vfm-000000.tar: the store is gone")
    time.sleep(60)
    return i


def test_the_first_failed_task_fails_the_call_and_cancels_the_rest(local_ray):
    # Four calls: a cancel that meets a task being handed to a worker can miss it (one call in
    # four here), and the call must then cancel it again rather than leave it running a minute.
    # (So without that, this fails about two times in three.)
    for _ in range(4):
        lines: list[str] = []
        with pytest.raises(ShardUploadError, match="^could not put shard vfm-000000.tar: the store is gone$"):
            ray_run_all(lines.append)(_upload_or_linger, [(i,) for i in range(3)])
        deadline = time.monotonic() + 10  # a task that outlived the call would hold its CPU for a minute
        while local_ray.available_resources().get("CPU", 0) < local_ray.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, f"CPUs still held: {local_ray.available_resources()}"
            time.sleep(0.2)
        assert lines == []
