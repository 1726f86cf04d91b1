"""The whole evaluation on real backbones: an HF DINOv3 folder, a vfm export, a random init."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.evaluation.encode import ArchitectureMismatch
from models.evaluation.report import NO_TRAINED_NOTE, TIED_SPREAD
from models.evaluation.suite import EvalSettings, evaluate_backbone
from models.registry import backbone_spec, build_from_spec
from models.weights import CheckpointError, export_backbone

SMALL = EvalSettings(resolution=16, max_train=60, max_test=20, copy_images=10, pca_images=3, pixel_side=8,
                     device="cpu")


def tiny_hf_folder(path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, num_register_tokens=2, image_size=16)
    torch.manual_seed(0)
    DINOv3ViTModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("hf") / "dinov3-tiny")


def test_hf_dinov3_folder_beside_random_init_and_raw_pixels(hf_folder, tmp_path):
    report = evaluate_backbone(str(hf_folder), ["builtin:lfw"], settings=SMALL, out_dir=tmp_path,
                               log=lambda m: None)
    assert report["backbone"]["format"] == "hf"
    assert report["backbone"]["spec"]["embed_dim"] == 32  # the baseline takes the checkpoint's architecture
    (entry,) = report["datasets"]
    assert set(entry["metrics"]) == {"trained", "random_init", "raw_pixels"}
    for metrics in entry["metrics"].values():
        assert {"knn_k10_top1", "knn_k20_top1", "linear_top1", "retrieval_map", "copy_recall1"} <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "linear_weight_decay")
    assert entry["gain"]["linear_top1"] == pytest.approx(
        entry["metrics"]["trained"]["linear_top1"] - entry["metrics"]["random_init"]["linear_top1"])
    assert json.loads((tmp_path / "report.json").read_text())["datasets"][0]["n_test"] == 20
    table = (tmp_path / "report.md").read_text()
    assert "| builtin:lfw | linear_top1 |" in table and "gain" in table
    for png in entry["pca_png"].values():
        with Image.open(tmp_path / png) as image:
            assert image.format == "PNG" and image.size == (3 * 96, 2 * 96)
            assert np.asarray(image)[96:].std() > 5


def test_random_init_baseline_is_the_same_pipeline_as_a_checkpoint(tmp_path):
    # A checkpoint that IS the seeded random init must score exactly like the baseline column.
    torch.manual_seed(SMALL.seed)
    export_backbone(build_from_spec(backbone_spec("vit_test")), str(tmp_path / "export"), fmt="vfm")
    report = evaluate_backbone(str(tmp_path / "export"), ["builtin:digits"], arch="vit_test", settings=SMALL,
                               out_dir=tmp_path / "out", log=lambda m: None)
    (entry,) = report["datasets"]
    assert entry["metrics"]["trained"] == entry["metrics"]["random_init"]
    assert all(g == 0 for g in entry["gain"].values())


def test_without_a_checkpoint_the_report_says_so(tmp_path):
    report = evaluate_backbone(None, ["builtin:lfw"], arch="vit_test", settings=SMALL, out_dir=tmp_path,
                               log=lambda m: None)
    metrics = report["datasets"][0]["metrics"]
    assert set(metrics) == {"random_init", "raw_pixels"}
    table = (tmp_path / "report.md").read_text()
    assert NO_TRAINED_NOTE in table
    # vit_test at init (layer scale 1e-5) gives every image the same CLS token: its k-NN ranks ties, and
    # the report says so for that column only.
    assert metrics["random_init"]["cls_cosine_spread"] < TIED_SPREAD < metrics["raw_pixels"]["cls_cosine_spread"]
    assert "builtin:lfw, random init: the k-NN features are alike to within float32 rounding" in table
    assert "raw pixels: the k-NN" not in table and "| cls_cosine_spread |" not in table


def test_checkpoint_of_another_architecture_is_a_one_line_error(hf_folder, tmp_path):
    with pytest.raises(ArchitectureMismatch, match="does not match the configured architecture: .*embed_dim 32 "
                                                   r"\(configured 64\)"):
        evaluate_backbone(str(hf_folder), ["builtin:lfw"], arch="vit_test", settings=SMALL, out_dir=tmp_path,
                          log=lambda m: None)


def test_missing_checkpoint_fails_before_any_work(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope'} does not exist"):
        evaluate_backbone(str(tmp_path / "nope"), ["builtin:lfw"], settings=SMALL, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
