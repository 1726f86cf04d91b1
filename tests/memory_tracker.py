"""A Tracker (orchestration.stage.Tracker) that keeps what a stage logs in memory, for stage tests
that build a StageContext by hand; the engine tests use the real MLflow store."""
from __future__ import annotations

from pathlib import Path


class MemoryTracker:
    def __init__(self):
        self.metrics: dict[str, float] = {}
        self.artifacts: list[tuple[str, str | None]] = []  # (file name, artifact_path)
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, local_path, artifact_path=None):
        assert Path(local_path).exists(), f"logged artifact {local_path} does not exist"
        self.artifacts.append((Path(local_path).name, artifact_path))

    def set_tags(self, tags):
        self.tags.update(tags)
