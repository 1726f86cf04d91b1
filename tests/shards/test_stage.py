"""The shard stage on a real local Ray: shards written by Ray tasks, a rerun keeps them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_curation.shards.reader import ShardDataset
from data_curation.shards.verify import verify_shards
from data_curation.storage import Storage
from orchestration.stage import StageContext
from pipeline.config.shard import ShardConfig
from pipeline.stages.shard import ShardStage
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
