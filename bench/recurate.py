"""Curating again after a change of sampling settings: what the kept embeddings save.

Runs the curate stage through the engine (real local Ray, MLflow store in a temp folder) on
the demo pool with the ``local`` preset's settings, three times in one run directory:

- first: the whole stage (list, decode, embed, dedup, cluster, sample): the baseline;
- new target: ``curate.sample.target`` changed, so the stage's fingerprint changes and it
  starts over, keeping the listing and the embeddings it made under the same settings;
- new decode limit, for contrast: ``curate.decode.min_side`` changed as well, which the
  embeddings depend on, so only the listing is kept and the pool is decoded and embedded again.

The figure is new-target seconds / first seconds (the share of the stage that a sampling
change still costs), beside the contrast's ratio, which should be near 1.

    python bench/recurate.py [--embedder builtin] [--image-size 224]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pipeline.config.root import load_config  # noqa: E402
from pipeline.stages import pipeline_engine  # noqa: E402
from pipeline.stages.curate import CurateStage  # noqa: E402


def curate(run_dir: Path, tmp: Path, sets: list[str]) -> dict:
    config = load_config("local", [f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                                   f"run.cache_dir={tmp / 'cache'}", *sets])
    lines: list[str] = []
    engine = pipeline_engine(config, str(run_dir), [CurateStage()], lines.append)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        metrics = engine.run().metrics["curate"]
    embedded = re.search(r"; (\d+) chunks? to embed", err.getvalue())
    kept = next((line.split("keeping ", 1)[1].split(" (")[0] for line in lines if "keeping" in line), "")
    return {"seconds": round(metrics["stage_seconds"], 2), "chunks_embedded": int(embedded.group(1)) if embedded else None,
            "kept": kept, "selected": int(metrics["selected"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedder", default="builtin", help="curate.embed.embedder of all three runs")
    parser.add_argument("--image-size", type=int, default=224, help="curate.embed.image_size (backbones)")
    args = parser.parse_args()
    base = [f"curate.embed.embedder={args.embedder}", f"curate.embed.image_size={args.image_size}",
            "curate.embed.chunk_size=128"]
    with tempfile.TemporaryDirectory(prefix="vfm-recurate-") as tmp:
        run_dir = Path(tmp) / "run"
        first = curate(run_dir, Path(tmp), base)
        new_target = curate(run_dir, Path(tmp), [*base, "curate.sample.target=0.2"])
        new_decode = curate(run_dir, Path(tmp), [*base, "curate.sample.target=0.2", "curate.decode.min_side=9"])
    print(json.dumps({
        "bench": "recurate", "embedder": args.embedder, "first": first, "new_target": new_target,
        "new_decode_limit": new_decode,
        "new_target_over_first": round(new_target["seconds"] / first["seconds"], 3),
        "new_decode_limit_over_first": round(new_decode["seconds"] / first["seconds"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
