"""The evaluate stage and `vfm eval`: a backbone's frozen features scored beside a random init.

The stage embeds the images with a Ray task per backbone (one GPU when the cluster has
one), keeps each task's features in the work folder so a rerun after an interruption
does not embed again, and writes report.json, report.md and the PCA patch-map PNGs into
the stage folder; metrics and PNGs also go to the stage's MLflow run. Until a train stage
exists the backbone is `evaluate.checkpoint`, which must match the `model` section's
architecture; without one only the random init of that architecture and raw pixels are
scored, and the report says so.

`vfm eval` runs the same evaluation in-process on any checkpoint; the random-init baseline
then takes the checkpoint's own architecture.

The models package (torch, seconds to import) is imported where the work is done, not with
this module: `vfm status`, a run with nothing to do and every one-line refusal build the
stages without running them.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from data_curation.labelled import DatasetError
from data_curation.storage import Storage, StorageError
from orchestration.ray_runtime import cluster_gpus, remote_cause
from orchestration.stage import Resources, Stage, StageContext

if TYPE_CHECKING:
    from models.evaluation.encode import BackboneSource, Encoded
    from models.evaluation.suite import EvalSettings


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the input is wrong", shown as their one-line message."""
    from models.evaluation.encode import ArchitectureMismatch
    from models.weights import CheckpointError

    return DatasetError, CheckpointError, ArchitectureMismatch, StorageError, FileNotFoundError


def settings_from(section: Any, seed: int) -> EvalSettings:
    """The library's settings from an EvaluateConfig section and the run seed."""
    from models.evaluation.suite import EvalSettings

    return EvalSettings(
        resolution=section.resolution, batch_size=section.batch_size, max_train=section.max_train,
        max_test=section.max_test, test_fraction=section.test_fraction, knn_k=tuple(section.knn_k),
        knn_temperature=section.knn_temperature, probe_weight_decays=tuple(section.probe_weight_decays),
        val_fraction=section.val_fraction, pixel_side=section.pixel_side, copy_images=section.copy_images,
        pca_images=section.pca_images, seed=seed, device=section.device)


@ray.remote
def _encode_task(source: BackboneSource, image_sets: dict[str, list[np.ndarray]],
                 patch_sets: dict[str, list[np.ndarray]], resolution: int, batch_size: int, device: str,
                 threads: int | None) -> Encoded:
    from models.evaluation.encode import encode_images

    return encode_images(source, image_sets, patch_sets, resolution, batch_size, device, threads)


class RayEncoder:
    """Runs the encoding job as a Ray task, reusing features a previous attempt saved in ``cache_uri``."""

    def __init__(self, cache_uri: str, storage: Storage, threads: int | None, log):
        self.cache_uri, self.storage, self.threads, self.log = cache_uri, storage, threads, log

    def __call__(self, source: BackboneSource, image_sets: dict[str, list[np.ndarray]],
                 patch_sets: dict[str, list[np.ndarray]], resolution: int, batch_size: int,
                 device: str) -> Encoded:
        key = _job_key(source, image_sets, patch_sets, resolution)
        uri = Storage.join(self.cache_uri, f"{'random' if source.checkpoint is None else 'trained'}-{key}.npz")
        if self.storage.exists(uri):
            try:
                encoded = _load_encoded(self.storage.read_bytes(uri))
                self.log(f"reusing features saved by an earlier attempt: {uri}")
                return encoded
            except _DAMAGED_NPZ as exc:  # would fail every attempt: encoded again instead
                self.log(f"warning: {uri} is damaged ({type(exc).__name__}: {exc}): encoding again")
                self.storage.rm(uri)
        gpus = 1 if device == "cuda" or (device == "auto" and cluster_gpus() >= 1) else 0
        task = _encode_task.options(num_cpus=self.threads or 1, num_gpus=gpus)
        try:
            encoded = ray.get(task.remote(source, image_sets, patch_sets, resolution, batch_size,
                                          "cuda" if gpus else "cpu", self.threads))
        except ray.exceptions.RayTaskError as exc:
            if (cause := remote_cause(exc, input_errors())) is not None:
                raise cause from None
            raise
        data = _dump_encoded(encoded)
        self.storage.write_bytes(uri, data)
        # Arrays Ray returns are read-only views of its object store; the saved copy is a plain one,
        # and is exactly what a resumed attempt would read.
        return _load_encoded(data)


def _job_key(source: BackboneSource, image_sets: dict[str, list[np.ndarray]],
             patch_sets: dict[str, list[np.ndarray]], resolution: int) -> str:
    """A digest of what decides the features: the backbone source and every image's bytes."""
    digest = hashlib.sha256(json.dumps([source.checkpoint, source.spec and source.spec.to_dict(), source.seed,
                                        resolution], sort_keys=True).encode())
    for sets in (image_sets, patch_sets):
        for name in sorted(sets):
            digest.update(name.encode())
            for image in sets[name]:
                digest.update(str(image.shape).encode())
                digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def _dump_encoded(encoded: Encoded) -> bytes:
    arrays = {f"cls:{k}": f.cls for k, f in encoded.features.items()}
    arrays |= {f"mean:{k}": f.patch_mean for k, f in encoded.features.items()}
    arrays |= {f"grid:{k}": g for k, g in encoded.patch_grids.items()}
    meta = {"spec": encoded.spec.to_dict(), "info": encoded.info}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta, default=str)), **arrays)
    return buffer.getvalue()


# What loading a damaged features file raises: zipfile's, numpy's and json's on bytes cut short or
# overwritten, KeyError for a missing array, TypeError for a spec of other fields.
_DAMAGED_NPZ = (zipfile.BadZipFile, EOFError, ValueError, KeyError, TypeError)


def _load_encoded(data: bytes) -> Encoded:
    from models.evaluation.encode import Encoded
    from models.evaluation.features import Features
    from models.vision_transformer import ViTSpec

    with np.load(io.BytesIO(data)) as npz:
        meta = json.loads(str(npz["meta"]))
        names = [k.split(":", 1)[1] for k in npz.files if k.startswith("cls:")]
        features = {n: Features(npz[f"cls:{n}"], npz[f"mean:{n}"]) for n in names}
        grids = {k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith("grid:")}
    return Encoded(features, grids, ViTSpec(**meta["spec"]), meta["info"])


def headline(report: dict[str, Any]) -> dict[str, float]:
    """k-NN and linear top-1 of the evaluated backbone (random init when none) per dataset, and the gains."""
    from models.evaluation.report import RANDOM_INIT, TRAINED

    out: dict[str, float] = {}
    for entry in report["datasets"]:
        source = TRAINED if TRAINED in entry["metrics"] else RANDOM_INIT
        metrics = entry["metrics"][source]
        knn = max((k for k in metrics if k.startswith("knn_") and k.endswith("_top1")),
                  key=lambda k: int(k.split("_k")[1].split("_")[0]))
        out[f"{entry['slug']}/{source}/{knn}"] = metrics[knn]
        out[f"{entry['slug']}/{source}/linear_top1"] = metrics["linear_top1"]
        if entry["gain"]:
            out[f"{entry['slug']}/gain/{knn}"] = entry["gain"][knn]
            out[f"{entry['slug']}/gain/linear_top1"] = entry["gain"]["linear_top1"]
    return out


class EvaluateStage(Stage):
    name = "evaluate"
    extra_sections = ("model", "run.seed")

    def resources(self, config: Any) -> Resources:
        section = config.evaluate
        return Resources(cpus=float(section.threads or 1), gpus=1.0 if section.device == "cuda" else 0.0)

    def reusable(self, config: Any) -> dict[str, Any]:
        # Saved features are named by a digest of the backbone and the images they came from.
        return {"_work/features": {}}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from models.evaluation.report import flat_metrics, render_report_table
        from models.evaluation.suite import evaluate_backbone

        cfg = ctx.section
        settings = settings_from(cfg, ctx.config.run.seed)
        out_dir = ctx.cache_dir / "report"
        encoder = RayEncoder(Storage.join(ctx.work_dir, "features"), ctx.storage, cfg.threads, ctx.log)
        report = evaluate_backbone(cfg.checkpoint, list(cfg.datasets), arch=ctx.config.model.vit_spec(),
                                   settings=settings, out_dir=out_dir, storage=ctx.storage, encode=encoder,
                                   log=ctx.log)
        files = sorted(p for p in out_dir.iterdir() if p.is_file())
        for path in files:
            ctx.storage.put_file(path, Storage.join(ctx.dir, path.name))
            ctx.tracker.log_artifact(path)
        ctx.tracker.log_metrics(flat_metrics(report))
        ctx.tracker.set_tags({"evaluate.checkpoint": cfg.checkpoint or "none: random-init baseline only",
                              "evaluate.report": Storage.join(ctx.dir, "report.md")})
        ctx.log("report:\n" + render_report_table(report))
        return headline(report)


def evaluate_cli(args: Any, log) -> int:
    """`vfm eval --checkpoint PATH --dataset NAME|URI [--dataset ...] [--out DIR] [--json] [--set ...]`."""
    from models.evaluation.report import render_report_table
    from models.evaluation.suite import dataset_slug, evaluate_backbone
    from pipeline.cli import UsageError
    from pipeline.config.root import load_config

    config = load_config(None, args.set)
    storage = Storage(config.storage.s3_options())
    settings = settings_from(config.evaluate, config.run.seed)
    out_dir = Path(args.out or f"runs/eval-{dataset_slug(args.checkpoint)}")
    try:
        report = evaluate_backbone(args.checkpoint, list(args.dataset), arch=None, settings=settings,
                                   out_dir=out_dir, storage=storage, log=log)
    except input_errors() as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(render_report_table(report), end="")
    log(f"report written to {out_dir}/report.json and report.md ({len(report['datasets'])} datasets)")
    sys.stdout.flush()
    return 0

