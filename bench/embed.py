"""Embedding throughput: the stage's Ray Data actor path against a bare loop, same model, same images.

Both embed the same decoded, prepared images (MNIST digits from the wheel, resized by the
embedder's ``prepare``) with the same batch size and the same number of torch threads:

- bare: ``scan.embed_rows`` called batch after batch in this process;
- ray: a materialised dataset of the stage's rows (pixels, accepted), one block per
  batch -> ``map_batches(EmbedActor)`` (the curate stage's actor, one actor with all
  the CPUs and as many torch threads as the bare loop) -> ``iter_batches``.

Throughput is steady-state images/s, from the first batch out to the last (the actor's
start-up, which loads the model once per run, is reported apart). Target: bare/ray
throughput (the overhead) <= 1.25.

    python bench/embed.py [--embedder arch:vit_test] [--image-size 112] [--images 1024] [--batch-size 128]
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_curation.builtin import load_builtin  # noqa: E402
from data_curation.embedders import build_embedder  # noqa: E402
from data_curation.scan import embed_rows  # noqa: E402


def bare_loop(prepared: np.ndarray, embedder, batch_size: int) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch)."""
    t0 = time.perf_counter()
    first = None
    for start in range(0, len(prepared), batch_size):
        batch = prepared[start:start + batch_size]
        embed_rows({"pixels": batch, "accepted": np.ones(len(batch), dtype=bool),
                    "reject_reason": np.full(len(batch), "", dtype=object)}, embedder)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return (len(prepared) - min(batch_size, len(prepared))) / (end - first), first - t0


def ray_path(prepared: np.ndarray, spec: str, image_size: int, batch_size: int, cpus: int) -> tuple[float, float]:
    """(images/s after the first batch out, seconds to the first batch, actor start-up included)."""
    import ray

    from pipeline.stages.curate_ray import EmbedActor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # The stage's row layout, built before the clock starts, one block per batch.
    rows = [{"pixels": p, "accepted": True} for p in prepared]
    ds = ray.data.from_items(rows, override_num_blocks=-(-len(prepared) // batch_size)).materialize()
    ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus,
                        fn_constructor_kwargs={"embedder": spec, "image_size": image_size, "torch_threads": cpus})
    t0 = time.perf_counter()
    first = None
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done += len(batch["embedding"])
        if first is None:
            first = time.perf_counter()
            first_rows = done
    end = time.perf_counter()
    assert done == len(prepared)
    return (len(prepared) - first_rows) / (end - first), first - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--embedder", default="arch:vit_test")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.cpus)
    digits = load_builtin("mnist5k").images[: args.images]
    embedder = build_embedder(args.embedder, args.image_size)
    prepared = np.stack([embedder.prepare(np.repeat(im[:, :, None], 3, axis=2)) for im in digits])
    bare_loop(prepared[: args.batch_size * 2], embedder, args.batch_size)  # warm-up (allocator, kernels)
    bare_ips, bare_first = bare_loop(prepared, embedder, args.batch_size)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory(prefix="vfm-ray-embed-", dir="/tmp") as tmp:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=tmp, logging_level="ERROR")
        try:
            ray_ips, ray_first = ray_path(prepared, args.embedder, args.image_size, args.batch_size, args.cpus)
        finally:
            ray.shutdown()
    print(json.dumps({
        "bench": "embed", "embedder": args.embedder, "image_size": args.image_size, "images": len(prepared),
        "batch_size": args.batch_size, "cpus": args.cpus,
        "bare_loop_images_per_s": round(bare_ips, 1), "ray_data_images_per_s": round(ray_ips, 1),
        "overhead_bare_over_ray": round(bare_ips / ray_ips, 3),
        "ray_first_batch_s_incl_actor_start": round(ray_first, 2), "bare_first_batch_s": round(bare_first, 3),
        "target": "overhead <= 1.25", "pass": bare_ips / ray_ips <= 1.25,
    }, indent=2))


if __name__ == "__main__":
    main()
