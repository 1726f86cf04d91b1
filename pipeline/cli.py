"""The `vfm` command line (DESIGN.md, "CLI contract")."""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
from typing import Any

from pipeline import __version__

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(RuntimeError):
    """A bad argument or input; printed as one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from data_curation.storage import StorageError
    from orchestration.engine import EngineError
    from orchestration.ray_runtime import RayError
    from orchestration.submit import SubmitError
    from orchestration.tracking import TrackingError
    from pipeline.config.load import ConfigError
    from pipeline.export import ExportError

    return (UsageError, ConfigError, EngineError, StorageError, TrackingError, RayError, SubmitError, ExportError,
            FileNotFoundError, PermissionError)


# -- shared helpers ------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _storage_from_sets(sets: list[str]):
    """A Storage from --set storage.* overrides and the AWS variables, before any config is read."""
    from data_curation.storage import Storage
    from pipeline.config.core import StorageConfig
    from pipeline.config.load import parse_override, validate

    values: dict[str, Any] = {}
    for text in sets:
        parts, value = parse_override(text)
        if parts[0] == "storage" and len(parts) == 2:
            values[parts[1]] = value
    return Storage(validate(values, StorageConfig, "--set storage").s3_options())


def _engine(config, run_dir: str):
    from pipeline.stages import pipeline_engine

    return pipeline_engine(config, run_dir, log=_log)


def _saved_config(run_dir: str, sets: list[str]):
    """The config a run directory was made with, plus --set overrides (for secrets, say)."""
    from pipeline.config.load import apply_override, parse_override, validate
    from pipeline.config.root import Config, load_saved_config

    storage = _storage_from_sets(sets)
    path = storage.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise UsageError(f"{run_dir} is not a vfm run directory (no config.yaml); start one with `vfm run`")
    config = load_saved_config(path, storage.read_text(path))
    run_json = storage.join(run_dir, "run.json")
    data = config.model_dump(mode="json")
    if storage.exists(run_json) and not data["mlflow"]["tracking_uri"]:
        data["mlflow"]["tracking_uri"] = storage.read_json(run_json).get("mlflow", {}).get("tracking_uri")
    for text in sets:
        parts, value = parse_override(text)
        apply_override(data, parts, value, Config)
    return validate(data, Config, path)


def _default_run_dir(config) -> str:
    return f"runs/{config.name}"


def _print_run_result(engine, result) -> None:
    for st in engine.statuses():
        _log(f"  {st.name:<10} {st.state}")
    _log(f"run directory: {engine.rundir.uri}")


# -- commands ------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from pipeline.config.root import load_config

    config = load_config(args.config, args.set)
    if args.address:
        config.ray.address = args.address
    engine = _engine(config, args.run_dir or _default_run_dir(config))
    return _run(engine, only=args.only, start=args.from_stage, force=args.force)


def cmd_resume(args) -> int:
    config = _saved_config(args.run_dir, args.set)
    return _run(_engine(config, args.run_dir))


def _run(engine, **options) -> int:
    """Run ``engine``; a failed or interrupted stage ends with the command that resumes this run."""
    from orchestration.engine import StageFailed

    resume = f"`vfm resume {shlex.quote(engine.rundir.uri)}`"
    try:
        result = engine.run(**options)
    except StageFailed as exc:
        print(f"vfm: {exc}; fix it and run {resume} (finished work is kept)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"vfm: interrupted; {resume} continues from what is finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_run_result(engine, result)
    return 0


def cmd_status(args) -> int:
    config = _saved_config(args.run_dir, args.set)
    engine = _engine(config, args.run_dir)
    rows = [st.as_dict() for st in engine.statuses()]
    if args.json:
        print(json.dumps({"run_dir": engine.rundir.uri, "config": config.name, "stages": rows}, indent=2))
        return 0
    print(f"run directory {engine.rundir.uri} (config {config.name})")
    print(f"{'stage':<10} {'state':<8} {'fingerprint':<17} {'mlflow run':<33} headline")
    for r in rows:
        head = ", ".join(f"{k}={v:.4g}" for k, v in list(r["metrics"].items())[:4])
        detail = f" ({r['detail']})" if r["detail"] else ""
        print(f"{r['stage']:<10} {r['state']:<8} {r['fingerprint']:<17} {(r['mlflow_run_id'] or '-'):<33} "
              f"{head}{detail}")
    return 0


def cmd_presets(args) -> int:
    from pipeline.config.root import list_presets

    for name, description in list_presets().items():
        print(f"{name:<12} {description}")
    return 0


def cmd_submit(args) -> int:
    from orchestration.submit import submit_run

    return submit_run(args.address, run_argv(args), config_path=args.config, follow=args.follow, log=_log)


def run_argv(args) -> list[str]:
    """The `vfm run ...` command line that reproduces the run options in ``args``."""
    argv = ["vfm", "run"]
    if args.config:
        argv += ["-c", args.config]
    for text in args.set:
        argv += ["--set", text]
    for flag, value in (("--run-dir", args.run_dir), ("--only", args.only), ("--from", args.from_stage)):
        if value:
            argv += [flag, value]
    if args.force:
        argv.append("--force")
    return argv


def cmd_plan(args) -> int:
    from pipeline.config.root import load_config

    config = load_config(args.config, args.set)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout when imported; keep stdout the plan
        from models.plan import PlanDoesNotFit, plan_model, render_plan

        try:
            plan = plan_model(config.model, config.train, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
        except PlanDoesNotFit as exc:
            raise UsageError(str(exc)) from None
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
    return 0


def cmd_eval(args) -> int:
    from pipeline.stages.evaluate import evaluate_cli

    return evaluate_cli(args, log=_log)


def cmd_export(args) -> int:
    from models.weights import CheckpointError
    from pipeline.export import export_run

    try:
        export_run(args.run_dir, args.format, args.out, storage=_storage_from_sets(args.set), log=_log)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_verify(args) -> int:
    from pipeline.stages.shard import verify_cli

    return verify_cli(args.run_dir, storage=_storage_from_sets(args.set), log=_log)


# -- parser --------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="a preset name (see `vfm presets`) or a YAML file; default: local")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (typed as YAML: 3, 0.5, true, [1, 2]); repeatable")
    p.add_argument("--run-dir", help="run directory: a local path or s3://bucket/prefix (default: runs/NAME)")
    p.add_argument("--only", metavar="STAGE", help="run just this stage (its upstream stages must be done)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every stage after it")
    p.add_argument("--force", action="store_true",
                   help="redo the selected stages from scratch; also take over a run dir of another config")


def _add_sets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. storage.endpoint_url=http://127.0.0.1:8333")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfm", description="vfm: from a raw image pool to an evaluated DINOv3-style vision foundation model. "
        "Stages run in order on Ray and are tracked in MLflow; see README.md.")
    parser.add_argument("--version", action="version", version=f"vfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (skips stages that are done)")
    _add_run_options(p)
    p.add_argument("--address", help="join this Ray cluster instead of starting a local Ray (or RAY_ADDRESS)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue an interrupted run from its run directory alone")
    p.add_argument("run_dir")
    _add_sets(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="per stage: done | pending | running | failed | stale")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_sets(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="submit `vfm run ...` to a Ray cluster through the Ray Jobs API")
    p.add_argument("--address", required=True, help="the Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    _add_run_options(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("plan", help="parameters, FLOPs and memory per GPU of the configured model; no run")
    p.add_argument("-c", "--config", help="a preset name or a YAML file; default: local")
    _add_sets(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="evaluate any backbone on labelled datasets (k-NN, linear probe, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="a vfm export folder, an HF DINOv3 folder or an official DINOv3 checkpoint")
    p.add_argument("--dataset", action="append", required=True,
                   help="builtin:mnist5k|digits|lfw, an ImageFolder path or s3:// URI, or WebDataset shards")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="folder for report.json, report.md and PNGs")
    _add_sets(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a run's trained backbone as HF transformers or DINOv3 weights")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=["hf", "dinov3", "vfm"])
    p.add_argument("out")
    _add_sets(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="re-read every shard of a run and check it against the index")
    p.add_argument("run_dir")
    _add_sets(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    errors = _user_errors()
    try:
        return int(args.func(args) or 0)
    except errors as exc:
        text = str(exc).strip().splitlines()
        print(f"vfm: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("vfm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
