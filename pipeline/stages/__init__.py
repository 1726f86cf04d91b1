"""The pipeline's stages, in the order the engine runs them."""
from __future__ import annotations

from orchestration.stage import Stage


def pipeline_stages() -> list[Stage]:
    from pipeline.stages.curate import CurateStage
    from pipeline.stages.evaluate import EvaluateStage
    from pipeline.stages.shard import ShardStage

    return [CurateStage(), ShardStage(), EvaluateStage()]


def stage_names() -> list[str]:
    return [s.name for s in pipeline_stages()]
