"""Fixtures of the shard tests: a pool of real images with its manifest, and shards built from it."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_curation.shards.build import ShardSpec, build_shards
from data_curation.shards.plan import ShardLimits
from tests.shards.image_pool import ImagePool, make_pool

SPEC = ShardSpec(prefix="t", limits=ShardLimits(samples=30, max_bytes=1 << 20, seed=3), shards_per_task=2)


@dataclass
class Built:
    pool: ImagePool
    shard_dir: str
    work_dir: str


@pytest.fixture(scope="session")
def pool_dir(tmp_path_factory) -> tuple[Path, ImagePool]:
    folder = tmp_path_factory.mktemp("pool")
    return folder, make_pool(str(folder), n=200)


@pytest.fixture
def pool(pool_dir) -> ImagePool:
    return pool_dir[1]


@pytest.fixture(scope="session")
def built_once(pool_dir, tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("built")
    built = Built(pool_dir[1], str(root / "shard"), str(root / "work"))
    build_shards(built.pool.manifest_uri, built.shard_dir, built.work_dir, SPEC, log=lambda _: None)
    return built


@pytest.fixture
def built(built_once, tmp_path) -> Built:
    """A private copy of the built shards, free to damage."""
    shutil.copytree(built_once.shard_dir, tmp_path / "shard")
    shutil.copytree(built_once.work_dir, tmp_path / "work")
    return Built(built_once.pool, str(tmp_path / "shard"), str(tmp_path / "work"))
