"""Frozen-feature evaluation of a backbone: k-NN, linear probe, retrieval, copy detection and
PCA patch maps, each beside the same architecture at random init and raw pixels.

One job per module: features (embedding), encode (the embedding job), knn, linear_probe,
retrieval, copies (augmented copies), pca_maps, report (JSON and Markdown), suite (the
whole evaluation). Plain torch/numpy/scipy; no Ray, no MLflow.
"""
from models.evaluation.report import render_report_table
from models.evaluation.suite import EvalSettings, evaluate_backbone

__all__ = ["EvalSettings", "evaluate_backbone", "render_report_table"]
