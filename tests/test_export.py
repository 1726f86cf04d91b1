"""`vfm export`: a run's trained backbone (train/export/, vfm format) in the HF and DINOv3 layouts."""
from __future__ import annotations

import torch

from models import build_backbone
from models.weights import export_backbone, load_backbone
from pipeline.cli import main


def test_export_to_hf_and_dinov3_keeps_the_weights(tmp_path, capsys):
    torch.manual_seed(0)
    backbone = build_backbone("vit_test").eval()
    export_backbone(backbone, str(tmp_path / "run" / "train" / "export"), "vfm")
    for fmt, path in (("hf", tmp_path / "hf"), ("dinov3", tmp_path / "dinov3" / "model.pth")):
        out = tmp_path / fmt
        assert main(["export", str(tmp_path / "run"), "--format", fmt, str(out)]) == 0
        again, info = load_backbone(str(path))
        assert info["format"] == fmt
        x = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            want, got = backbone.forward_features(x), again.forward_features(x)
        assert torch.allclose(want["x_norm_clstoken"], got["x_norm_clstoken"], atol=1e-5)


def test_export_without_a_trained_backbone_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no trained backbone" in err[0]
