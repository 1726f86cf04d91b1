"""Config of the shard stage: how the curated images are cut into WebDataset shards."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import EXECUTION, Section


class ShardConfig(Section):
    name: str = Field("vfm", pattern=r"^[A-Za-z0-9_-]+$",
                      description="Shard file prefix: shards are NAME-000000.tar, NAME-000001.tar, ...")
    samples_per_shard: int = Field(256, ge=1, description="Most samples in one shard.")
    max_shard_bytes: int = Field(256 * 2**20, ge=4096,
                                 description="Byte cap of one shard, counted on the source image sizes "
                                             "plus a fixed per-sample overhead.")
    seed: int = Field(0, ge=0, description="Seed of the sample order (clusters are spread evenly over shards).")
    max_side: int | None = Field(None, ge=8, description="Downscale images whose longer side exceeds this; "
                                                         "None keeps every size.")
    encode_format: Literal["jpeg", "png", "webp"] = Field(
        "jpeg", description="Format for images that are re-encoded (resized, or not JPEG/PNG/WebP at the source).")
    encode_quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality of re-encoded images.")
    shards_per_task: int = Field(4, ge=1, json_schema_extra=EXECUTION,
                                 description="Shards written by one Ray task.")
    stat_batch: int = Field(2048, ge=1, json_schema_extra=EXECUTION,
                            description="Source files sized by one Ray task while planning, for a manifest "
                            "without file sizes (older runs; curate now records them).")
    upload_attempts: int = Field(5, ge=1, json_schema_extra=EXECUTION,
                                 description="Tries to upload a shard to S3 before giving up.")
    upload_backoff_s: float = Field(0.5, ge=0.0, json_schema_extra=EXECUTION,
                                    description="Wait before the 2nd upload try; doubled per try.")
