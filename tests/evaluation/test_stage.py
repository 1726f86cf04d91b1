"""The evaluate stage on a real local Ray, and `vfm eval` on an HF DINOv3 folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_curation.storage import Storage
from orchestration.stage import StageContext
from pipeline.cli import main
from pipeline.config.evaluate import EvaluateConfig
from pipeline.config.root import Config
from pipeline.stages.evaluate import EvaluateStage
from tests.evaluation.test_evaluate_backbone import tiny_hf_folder
from tests.memory_tracker import MemoryTracker

TINY = dict(datasets=["builtin:lfw"], max_train=60, max_test=20, resolution=16, copy_images=10, pca_images=2,
            pixel_side=8)


@pytest.fixture
def local_ray(ray_session):
    """The session's one local Ray (tests/conftest.py)."""
    return ray_session


def _context(run_dir: Path, config: Config) -> StageContext:
    return StageContext(name="evaluate", config=config, section=config.evaluate, run_dir=str(run_dir),
                        dir=str(run_dir / "evaluate"), work_dir=str(run_dir / ".work" / "evaluate"),
                        cache_dir=run_dir / ".cache", storage=Storage(), tracker=MemoryTracker())


@pytest.mark.slow
def test_stage_without_checkpoint_reports_the_baselines_and_reuses_features(local_ray, tmp_path, capsys):
    config = Config(evaluate=EvaluateConfig(**TINY))
    ctx = _context(tmp_path, config)
    headline = EvaluateStage().run(ctx)
    assert set(headline) == {"lfw/random_init/knn_k20_top1", "lfw/random_init/linear_top1"}
    stage_dir = Path(ctx.dir)
    assert {"report.json", "report.md", "pca_lfw_random_init.png"} <= {p.name for p in stage_dir.iterdir()}
    assert "No trained backbone was given" in (stage_dir / "report.md").read_text()
    assert "lfw/raw_pixels/knn_k10_top1" in ctx.tracker.metrics
    assert ("pca_lfw_random_init.png", None) in ctx.tracker.artifacts
    assert len(list((tmp_path / ".work" / "evaluate" / "features").iterdir())) == 1
    first = json.loads((stage_dir / "report.json").read_text())

    again = EvaluateStage().run(_context(tmp_path, config))
    assert "reusing features saved by an earlier attempt" in capsys.readouterr().err
    assert again == headline
    assert json.loads((stage_dir / "report.json").read_text())["datasets"] == first["datasets"]

    saved = next((tmp_path / ".work" / "evaluate" / "features").iterdir())
    saved.write_bytes(saved.read_bytes()[:1000])  # cut short: would fail every attempt if loaded
    assert EvaluateStage().run(_context(tmp_path, config)) == headline
    assert f"warning: {saved} is damaged (BadZipFile" in capsys.readouterr().err
    assert json.loads((stage_dir / "report.json").read_text())["datasets"] == first["datasets"]
    assert len(saved.read_bytes()) > 1000


@pytest.mark.slow
def test_a_changed_evaluate_config_reuses_the_saved_features(local_ray, tmp_path, mlflow_uri, capsys):
    from pipeline.config.core import MlflowConfig, RunConfig
    from pipeline.stages import pipeline_engine

    def evaluate(**changes) -> list[str]:
        config = Config(evaluate=EvaluateConfig(**{**TINY, **changes}), mlflow=MlflowConfig(tracking_uri=mlflow_uri),
                        run=RunConfig(cache_dir=str(tmp_path / "cache")))
        lines: list[str] = []
        pipeline_engine(config, str(tmp_path / "run"), [EvaluateStage()], lines.append).run()
        return lines

    evaluate()
    capsys.readouterr()
    lines = evaluate(knn_k=[5])
    assert "[evaluate] its config changed: starting over, but keeping _work/features (made under the same " \
           "settings)" in lines
    assert "reusing features saved by an earlier attempt" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "evaluate" / "report.json").read_text())
    assert "knn_k5_top1" in json.dumps(report) and "knn_k20_top1" not in json.dumps(report)


@pytest.mark.slow
def test_stage_rejects_a_checkpoint_of_another_architecture(local_ray, tmp_path):
    folder = tiny_hf_folder(tmp_path / "hf")
    config = Config(evaluate=EvaluateConfig(checkpoint=str(folder), **TINY))
    with pytest.raises(ValueError, match="does not match the configured architecture"):
        EvaluateStage().run(_context(tmp_path, config))


def test_vfm_eval_on_an_hf_dinov3_folder(tmp_path, capsys):
    folder = tiny_hf_folder(tmp_path / "hf")
    sets = [f"evaluate.{k}={v}" for k, v in TINY.items() if k != "datasets"]
    argv = ["eval", "--checkpoint", str(folder), "--dataset", "builtin:lfw", "--out", str(tmp_path / "out")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "| dataset | metric | trained | random init | raw pixels | gain |" in out
    assert "| builtin:lfw | knn_k20_top1 |" in out
    assert (tmp_path / "out" / "report.json").is_file()


def test_vfm_eval_bad_dataset_is_one_line(tmp_path, capsys):
    folder = tiny_hf_folder(tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(folder), "--dataset", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vfm: error: dataset {tmp_path / 'nope'}: no such folder"
    assert not out.exists()  # nothing half-written
