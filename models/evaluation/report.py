"""The evaluation report: a JSON-ready dict and its Markdown table.

The table has one row per dataset and metric and one column per feature source: the
trained backbone (when one was given), the same architecture at random init, raw pixels,
and the gain of the trained backbone over random init.
"""
from __future__ import annotations

from typing import Any

TRAINED, RANDOM_INIT, RAW_PIXELS = "trained", "random_init", "raw_pixels"
SOURCES = (TRAINED, RANDOM_INIT, RAW_PIXELS)
_HEADERS = {TRAINED: "trained", RANDOM_INIT: "random init", RAW_PIXELS: "raw pixels"}
NO_TRAINED_NOTE = ("No trained backbone was given: only the random-init baseline and raw pixels "
                   "were evaluated.")
# The spread of the cosine similarity between the k-NN features (models.evaluation.knn.cosine_spread):
# below TIED_SPREAD the features are alike to within float32 rounding, and the k-NN, retrieval and
# copy-detection figures of that source rank ties (features k-NN still tells apart spread by 1e-7
# and more). Not a protocol: kept out of the table and the gains.
TIE_METRIC = "cls_cosine_spread"
TIED_SPREAD = 1e-8
_NOT_IN_TABLE = ("linear_weight_decay", TIE_METRIC)


def add_gains(dataset_entry: dict[str, Any]) -> None:
    """Fill ``dataset_entry["gain"]``: trained minus random init, for every metric both have."""
    metrics = dataset_entry["metrics"]
    if TRAINED not in metrics:
        dataset_entry["gain"] = {}
        return
    baseline = metrics.get(RANDOM_INIT, {})
    dataset_entry["gain"] = {name: value - baseline[name] for name, value in metrics[TRAINED].items()
                             if name in baseline and name not in _NOT_IN_TABLE}


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``{dataset}/{source}/{metric}`` -> value (and ``{dataset}/gain/{metric}``), for MLflow."""
    out: dict[str, float] = {}
    for entry in report["datasets"]:
        slug = entry["slug"]
        for source, metrics in entry["metrics"].items():
            out.update({f"{slug}/{source}/{name}": float(v) for name, v in metrics.items()})
        out.update({f"{slug}/gain/{name}": float(v) for name, v in entry.get("gain", {}).items()})
    return out


def _metric_names(entry: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for source in SOURCES:
        for name in entry["metrics"].get(source, {}):
            if name not in names and name not in _NOT_IN_TABLE:
                names.append(name)
    return names


def render_report_table(report: dict[str, Any]) -> str:
    """The report as Markdown: a header, the backbone, then dataset x metric x source."""
    trained = report["backbone"]["checkpoint"] is not None
    sources = [s for s in SOURCES if trained or s != TRAINED]
    headers = ["dataset", "metric"] + [_HEADERS[s] for s in sources] + (["gain"] if trained else [])
    lines = ["# Evaluation report", ""]
    backbone = report["backbone"]
    if trained:
        lines.append(f"Backbone: `{backbone['checkpoint']}` ({backbone.get('format', '?')}, "
                     f"{backbone.get('arch', '?')}); random init: same architecture, seed {report['seed']}.")
    else:
        lines.append(NO_TRAINED_NOTE)
        lines.append(f"Random init: `{backbone.get('arch', '?')}`, seed {report['seed']}.")
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for entry in report["datasets"]:
        for name in _metric_names(entry):
            cells = [entry["name"], name]
            cells += [_fmt(entry["metrics"].get(s, {}).get(name)) for s in sources]
            if trained:
                gain = entry.get("gain", {}).get(name)
                cells.append("" if gain is None else f"{gain:+.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for entry in report["datasets"]:
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(entry["skipped"].items())) or "none"
        lines.append(f"- {entry['name']}: {entry['n_train']} train / {entry['n_test']} test images, "
                     f"{len(entry['classes'])} classes; skipped: {skipped}")
        for source in sources:
            spread = entry["metrics"].get(source, {}).get(TIE_METRIC)
            if spread is not None and spread < TIED_SPREAD:
                why = (" A ViT at init with layer scale 1e-5 is like this: its blocks barely add to the class "
                       "token; its linear probe reads CLS and mean patch." if source == RANDOM_INIT else "")
                lines.append(f"- {entry['name']}, {_HEADERS[source]}: the k-NN features are alike to within float32 "
                             f"rounding (cosine spread {spread:.1e}), so the k-NN, retrieval and copy-detection "
                             f"figures rank ties and measure nothing.{why}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
