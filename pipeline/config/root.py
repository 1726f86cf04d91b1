"""The whole pipeline's config: one strict section per stage plus run, ray, mlflow, storage."""
from __future__ import annotations

from pydantic import Field

from pipeline.config.base import Section
from pipeline.config.core import MlflowConfig, RayConfig, RunConfig, StorageConfig
from pipeline.config.curate import CurateConfig
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.load import ConfigError, dump_config, flatten_config, list_presets
from pipeline.config.load import load_config as _load
from pipeline.config.load import load_config_file as _load_file
from pipeline.config.model import ModelConfig
from pipeline.config.shard import ShardConfig
from pipeline.config.train import TrainConfig


class Config(Section):
    name: str = Field("local", description="Config name: the MLflow experiment and the default run directory.")
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    storage: StorageConfig = StorageConfig()
    model: ModelConfig = ModelConfig()
    curate: CurateConfig = CurateConfig()
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


def load_config(source: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name or YAML path (None: the `local` preset) with --set overrides, validated."""
    return _load(source, overrides, model=Config)


def load_saved_config(label: str, text: str) -> Config:
    """The config.yaml of a run directory."""
    return _load_file(label, text, model=Config)


__all__ = ["Config", "ConfigError", "dump_config", "flatten_config", "list_presets", "load_config",
           "load_saved_config"]
