"""The pipeline's stages, in the order the engine runs them."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from orchestration.stage import Stage

if TYPE_CHECKING:
    from orchestration.engine import Engine


def pipeline_stages() -> list[Stage]:
    from pipeline.stages.curate import CurateStage
    from pipeline.stages.evaluate import EvaluateStage
    from pipeline.stages.shard import ShardStage

    return [CurateStage(), ShardStage(), EvaluateStage()]


def stage_names() -> list[str]:
    return [s.name for s in pipeline_stages()]


def pipeline_engine(config, run_dir: str, stages: list[Stage] | None = None,
                    log: Callable[[str], None] = print) -> Engine:
    """The engine over ``stages`` (default: the whole pipeline) for ``config`` and a run
    directory, as `vfm run` builds it."""
    from data_curation.storage import Storage
    from orchestration.engine import Engine
    from pipeline import __version__
    from pipeline.config.root import dump_config, flatten_config

    return Engine(config, pipeline_stages() if stages is None else stages, run_dir,
                  storage=Storage(config.storage.s3_options()), version=__version__, dump_config=dump_config,
                  flat_params=flatten_config, log=log)
