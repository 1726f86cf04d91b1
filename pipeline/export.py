"""`vfm export`: the trained teacher backbone of a run (train/export/, vfm format) in another layout."""
from __future__ import annotations

from collections.abc import Callable

from data_curation.storage import Storage


class ExportError(RuntimeError):
    """Nothing to export, or the export failed; one line naming the run."""


def export_run(run_dir: str, fmt: str, out: str, *, storage: Storage, log: Callable[[str], None]) -> list[str]:
    from models.weights import export_backbone, load_backbone

    source = storage.join(run_dir, "train", "export")
    if not storage.exists(storage.join(source, "config.json")):
        raise ExportError(f"{run_dir} has no trained backbone ({source} is missing): the train stage writes it")
    backbone, info = load_backbone(source, storage)
    files = export_backbone(backbone, out, fmt, storage)  # type: ignore[arg-type]
    log(f"exported the {info['arch_spec'].get('embed_dim', '?')}-dim backbone of {run_dir} as {fmt}: "
        + ", ".join(files))
    return files
