"""The stage API: what a pipeline stage declares and what the engine hands it when it runs.

A stage is a class with a name (also its config section and its run-directory folder),
the upstream stages whose outputs it reads, a format version, and the Ray resources
one of its tasks needs. Its ``run`` gets a :class:`StageContext` and returns headline
metrics. The engine decides whether it runs (fingerprints), writes its marker, and
tracks it in MLflow; the stage only does its work and writes under ``ctx.dir``.
"""
from __future__ import annotations

import abc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from orchestration.storage import Storage


@dataclass(frozen=True)
class Resources:
    """What a stage asks of Ray: its largest single request (one task or actor), and what it
    holds for its whole run beside its tasks (an actor pool), which the cluster must fit with
    at least one CPU to spare for those tasks. ``asked_by`` and ``held_by`` name the config
    keys behind each part, for the error when it does not fit."""

    cpus: float = 1.0
    gpus: float = 0.0
    asked_by: str = ""
    held_cpus: float = 0.0
    held_gpus: float = 0.0
    held_by: str = ""


class Tracker(Protocol):
    """What a stage may tell MLflow; the engine binds it to the stage's nested run."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class StageContext:
    """Everything a running stage needs, and nothing of the engine's internals.

    ``dir`` is the stage's folder in the run directory (a URI). ``work_dir`` keeps the
    stage's inner checkpoints: it survives a failed or killed attempt, so the next
    attempt finds finished pieces there and continues; it is emptied only by --force.
    ``cache_dir`` is local scratch that may vanish between attempts.
    """

    name: str
    config: Any  # pipeline.config.Config, the whole resolved config
    section: Any  # this stage's config section
    run_dir: str
    dir: str
    work_dir: str
    cache_dir: Path
    storage: Storage
    tracker: Tracker
    upstream_dirs: dict[str, str] = field(default_factory=dict)

    def upstream(self, name: str) -> str:
        """The run-directory folder of an upstream stage this stage declared in ``requires``."""
        if name not in self.upstream_dirs:
            raise KeyError(f"stage {self.name!r} did not declare {name!r} in requires")
        return self.upstream_dirs[name]

    def log(self, message: str) -> None:
        """One progress line on stderr, prefixed with the time and the stage name."""
        print(f"{time.strftime('%H:%M:%S')} [{self.name}] {message}", file=sys.stderr, flush=True)


class Stage(abc.ABC):
    """One step of the pipeline; subclasses live in pipeline/stages/."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    # Other config sections or values whose change changes this stage's output ("model", "run.seed").
    extra_sections: ClassVar[tuple[str, ...]] = ()
    format_version: ClassVar[int] = 1

    def resources(self, config: Any) -> Resources:
        """The Ray resources this stage will ask for under ``config``."""
        return Resources()

    def reusable(self, config: Any) -> dict[str, Any]:
        """Paths inside the stage's folder (``"_work/embeddings"``) and the config values that
        their contents depend on, as JSON-able values. When the stage's config changes, a path
        whose values are those it was written under, with the same stages upstream, is kept and
        the stage goes on from it; the rest of its folder is cleared. --force keeps nothing.
        Default: nothing survives a config change."""
        return {}

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, float]:
        """Do the stage's work under ``ctx.dir`` and return its headline metrics."""
