"""Config of the evaluate stage: which backbone, which labelled datasets, and the protocols' knobs."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.base import EXECUTION, Section


class EvaluateConfig(Section):
    checkpoint: str | None = Field(
        None, description="Backbone to evaluate: a vfm export folder, an HF DINOv3 folder or an official DINOv3 "
                          "checkpoint, local or s3://. None (and no train stage): only the random-init baseline "
                          "of model.arch and raw pixels are evaluated, and the report says so.")
    datasets: list[str] = Field(
        ["builtin:digits", "builtin:mnist5k"], min_length=1,
        description="Labelled datasets: builtin:mnist5k|digits|lfw, an ImageFolder folder (class = sub-folder; "
                    "train/ and test/ sub-folders are used as the split when present) or WebDataset shards "
                    "with a cls field (a .tar, a {000..009} pattern or a folder of .tar), local or s3://.")
    max_train: int | None = Field(2000, ge=2, description="Most train images per dataset (seeded subsample); "
                                                          "None uses all.")
    max_test: int | None = Field(500, ge=1, description="Most test images per dataset (seeded subsample); "
                                                        "None uses all.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each class held out for test when a "
                                                               "dataset has no split of its own.")
    resolution: int = Field(32, ge=8, description="Side the images are resized to before the backbone (rounded "
                                                  "to a multiple of the patch size).")
    batch_size: int = Field(256, ge=1, json_schema_extra=EXECUTION, description="Images per forward pass.")
    knn_k: list[int] = Field([10, 20], min_length=1, description="k of the weighted k-NN classifier.")
    knn_temperature: float = Field(0.07, gt=0, description="Temperature of the k-NN vote weights "
                                                           "exp(similarity / T).")
    probe_weight_decays: list[float] = Field(
        [1e-4, 1e-3, 1e-2, 1e-1], min_length=1,
        description="L2 strengths swept by the linear probe; the best on a validation split of train is used.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of train held out to choose the probe's "
                                                              "weight decay.")
    pixel_side: int = Field(16, ge=4, description="Side of the resized images used as raw-pixel features.")
    copy_images: int = Field(200, ge=1, description="Test images copied (crop, flip, tone, JPEG) for the "
                                                    "copy-detection check; train images are the distractors.")
    pca_images: int = Field(4, ge=1, le=32, description="Test images shown in each PCA patch-map grid.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", json_schema_extra=EXECUTION,
        description="Device of the feature pass (auto: cuda when the Ray task got a GPU).")
    threads: int | None = Field(None, ge=1, json_schema_extra=EXECUTION,
                                description="torch CPU threads of the feature pass (None: torch's default).")

    @field_validator("knn_k")
    @classmethod
    def _positive_k(cls, value: list[int]) -> list[int]:
        if any(k < 1 for k in value):
            raise ValueError("every k must be at least 1")
        return value
