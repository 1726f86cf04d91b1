"""The whole evaluation of one backbone: datasets in, report (JSON-ready dict, Markdown, PNGs) out.

Every metric is computed for the given backbone, for the same architecture at random init
(seeded the same way every run) and for raw pixels, on the same images in the same run.
Datasets are all loaded and checked before any backbone is built, so a bad dataset name
fails in a second, not after the first model has been embedded.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_curation.labelled import LabelledDataset, load_labelled
from data_curation.storage import Storage
from models.evaluation.copies import make_copies
from models.evaluation.encode import BackboneSource, Encoded, encode_images
from models.evaluation.features import Features, pixel_features
from models.evaluation.knn import cosine_spread, knn_classify
from models.evaluation.linear_probe import DEFAULT_WEIGHT_DECAYS, linear_probe
from models.evaluation.pca_maps import pca_rgb, save_pca_grid
from models.evaluation.report import (
    NO_TRAINED_NOTE,
    RANDOM_INIT,
    RAW_PIXELS,
    TIE_METRIC,
    TRAINED,
    add_gains,
    render_report_table,
)
from models.evaluation.retrieval import copy_detection, retrieval_map
from models.registry import backbone_spec
from models.vision_transformer import ViTSpec
from models.weights import CheckpointError


@dataclass(frozen=True)
class EvalSettings:
    resolution: int = 64
    batch_size: int = 256
    max_train: int | None = 2000
    max_test: int | None = 500
    test_fraction: float = 0.2
    knn_k: tuple[int, ...] = (10, 20)
    knn_temperature: float = 0.07
    probe_weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    val_fraction: float = 0.2
    pixel_side: int = 16
    copy_images: int = 200
    pca_images: int = 4
    seed: int = 0
    device: str = "auto"


# (source, image sets, patch sets, resolution, batch size, device) -> Encoded; the stage swaps in a Ray task.
Encoder = Callable[[BackboneSource, dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], int, int, str], Encoded]


def dataset_slug(name: str) -> str:
    """A name safe for files and MLflow keys: ``builtin:mnist5k`` -> ``mnist5k``, a path -> its last parts."""
    base = name.removeprefix("builtin:").rstrip("/")
    base = "_".join(base.split("/")[-2:]) if "/" in base else base
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_.") or "dataset"


def evaluate_backbone(checkpoint: str | None, datasets: list[str], *, arch: str | ViTSpec | None = None,
                      settings: EvalSettings = EvalSettings(), out_dir: str | Path = "eval",
                      storage: Storage | None = None, encode: Encoder = encode_images,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (or, when None, only the random init of ``arch``) on ``datasets``.

    ``arch`` (a registry name or a spec) is the configured architecture: a checkpoint must
    match it. Without ``arch`` the random-init baseline takes the checkpoint's own
    architecture. Writes report.json, report.md and pca_<dataset>_<source>.png into
    ``out_dir`` (a local folder) and returns the report.
    """
    if checkpoint is None and arch is None:
        raise ValueError("nothing to evaluate: give a checkpoint or an architecture")
    storage = storage or Storage()
    if checkpoint is not None and not storage.exists(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    loaded = [_load(name, storage, settings, log) for name in datasets]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slugs = _unique_slugs([d.name for d in loaded])
    image_sets, patch_sets = _image_sets(loaded, slugs, settings)
    configured = backbone_spec(arch) if isinstance(arch, str) else arch

    encoded: dict[str, Encoded] = {}
    if checkpoint is not None:
        log(f"embedding {sum(map(len, image_sets.values()))} images with {checkpoint}")
        encoded[TRAINED] = encode(BackboneSource(checkpoint, configured, settings.seed, storage.s3),
                                  image_sets, patch_sets, settings.resolution, settings.batch_size, settings.device)
    random_spec = configured or encoded[TRAINED].spec
    log(f"embedding with the random-init baseline (seed {settings.seed})")
    encoded[RANDOM_INIT] = encode(BackboneSource(None, random_spec, settings.seed),
                                  image_sets, patch_sets, settings.resolution, settings.batch_size, settings.device)

    entries = []
    for dataset, slug in zip(loaded, slugs, strict=True):
        log(f"scoring {dataset.name}")
        entries.append(_score_dataset(dataset, slug, encoded, image_sets[f"{slug}/copies"], settings, out))
    report = {
        "backbone": {
            "checkpoint": checkpoint,
            "format": encoded[TRAINED].info.get("format") if checkpoint else None,
            "arch": arch if isinstance(arch, str) else _describe(random_spec),
            "spec": random_spec.to_dict(),
            "note": None if checkpoint else NO_TRAINED_NOTE,
        },
        "seed": settings.seed,
        "settings": asdict(settings),
        "datasets": entries,
    }
    storage.write_json(str(out / "report.json"), report)
    storage.write_text(str(out / "report.md"), render_report_table(report))
    return report


def _load(name: str, storage: Storage, settings: EvalSettings, log: Callable[[str], None]) -> LabelledDataset:
    dataset = load_labelled(name, storage, seed=settings.seed, test_fraction=settings.test_fraction,
                            max_train=settings.max_train, max_test=settings.max_test)
    skipped = f"; skipped {dataset.skipped}" if dataset.skipped else ""
    log(f"{name}: {len(dataset.train)} train / {len(dataset.test)} test images, "
        f"{len(dataset.classes)} classes{skipped}")
    return dataset


def _unique_slugs(names: list[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        slug = dataset_slug(name)
        slugs.append(slug if slug not in slugs else f"{slug}_{len(slugs)}")
    return slugs


def _image_sets(loaded: list[LabelledDataset], slugs: list[str], settings: EvalSettings
                ) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    image_sets: dict[str, list[np.ndarray]] = {}
    patch_sets: dict[str, list[np.ndarray]] = {}
    for dataset, slug in zip(loaded, slugs, strict=True):
        image_sets[f"{slug}/train"] = dataset.train.images
        image_sets[f"{slug}/test"] = dataset.test.images
        image_sets[f"{slug}/copies"] = make_copies(dataset.test.images[:settings.copy_images], seed=settings.seed)
        patch_sets[slug] = dataset.test.images[:settings.pca_images]
    return image_sets, patch_sets


def _protocols(train: np.ndarray, test: np.ndarray, probe_train: np.ndarray, probe_test: np.ndarray,
               copies: np.ndarray, dataset: LabelledDataset, settings: EvalSettings) -> dict[str, float]:
    """k-NN, retrieval and copy detection on ``train``/``test``; the linear probe on ``probe_*``."""
    y_train, y_test = dataset.train.labels, dataset.test.labels
    metrics = knn_classify(train, y_train, test, y_test, ks=settings.knn_k,
                           temperature=settings.knn_temperature, num_classes=len(dataset.classes))
    metrics.update(linear_probe(probe_train, y_train, probe_test, y_test,
                                weight_decays=settings.probe_weight_decays,
                                val_fraction=settings.val_fraction, seed=settings.seed))
    metrics.update(retrieval_map(train, y_train, test, y_test))
    metrics.update(copy_detection(copies, test[:len(copies)], train))
    metrics[TIE_METRIC] = cosine_spread(train, seed=settings.seed)  # whether the three above rank ties
    return metrics


def _score_dataset(dataset: LabelledDataset, slug: str, encoded: dict[str, Encoded],
                   copy_images: list[np.ndarray], settings: EvalSettings, out: Path) -> dict[str, Any]:
    metrics: dict[str, dict[str, float]] = {}
    pngs: dict[str, str] = {}
    for source, enc in encoded.items():
        train: Features = enc.features[f"{slug}/train"]
        test: Features = enc.features[f"{slug}/test"]
        copies: Features = enc.features[f"{slug}/copies"]
        metrics[source] = _protocols(train.cls, test.cls, train.concatenated(), test.concatenated(),
                                     copies.cls, dataset, settings)
        if slug in enc.patch_grids:
            shown = dataset.test.images[:settings.pca_images]
            png = save_pca_grid(shown, pca_rgb(enc.patch_grids[slug]), out / f"pca_{slug}_{source}.png")
            pngs[source] = png.name
    pixels = {split: pixel_features(images, settings.pixel_side) for split, images in
              (("train", dataset.train.images), ("test", dataset.test.images),
               ("copies", copy_images))}
    metrics[RAW_PIXELS] = _protocols(pixels["train"], pixels["test"], pixels["train"], pixels["test"],
                                     pixels["copies"], dataset, settings)
    entry = {"name": dataset.name, "slug": slug, "classes": dataset.classes, "n_train": len(dataset.train),
             "n_test": len(dataset.test), "skipped": dataset.skipped, "metrics": metrics, "pca_png": pngs}
    add_gains(entry)
    return entry


def _describe(spec: Any) -> str:
    return f"ViT patch {spec.patch_size}, dim {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}"
