"""Benchmark of the evaluation's two hot paths, each against its bare baseline in the same run.

1. Feature pass: images/s of ``extract_features`` (uint8 images of the dataset in, resized,
   normalised, CLS + mean patch out) vs. a bare ``forward_features`` loop over tensors
   prepared beforehand. ``overhead`` = bare rate / evaluation rate (target <= 1.2).
2. k-NN: ``knn_classify`` over N_train x D random features vs. the bare batched matmuls
   (test @ train.T) it is built on. ``overhead`` = k-NN time / matmul time.

Prints one JSON object. Default: seconds on a 2-core CPU; --full: ViT-S at 224 px on
5,000 MNIST images and 10k k-NN queries against 50k x 1024.

    python bench/eval.py [--full] [--arch vit_test] [--images 2000] [--resolution 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_curation.builtin import load_builtin  # noqa: E402
from models import build_backbone  # noqa: E402
from models.evaluation.features import extract_features, images_to_tensor, model_resolution  # noqa: E402
from models.evaluation.knn import knn_classify  # noqa: E402


def _best_interleaved(repeats: int, first, second) -> tuple[float, float]:
    """Best wall time of each function, run in turns so that load from other processes hits both alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def bench_features(arch: str, n_images: int, resolution: int, batch_size: int, repeats: int) -> dict:
    images = load_builtin("mnist5k").images[:n_images]
    torch.manual_seed(0)
    backbone = build_backbone(arch)
    side = model_resolution(resolution, backbone.patch_size)
    batches = [images_to_tensor(images[i:i + batch_size], side) for i in range(0, len(images), batch_size)]

    @torch.inference_mode()
    def bare() -> None:
        for x in batches:
            out = backbone.forward_features(x)
            out["x_norm_clstoken"].float().cpu()
            out["x_norm_patchtokens"].float().mean(dim=1).cpu()

    def evaluation() -> None:
        extract_features(backbone, images, resolution, batch_size, device="cpu")

    bare()  # warm-up: first calls allocate
    t_eval, t_bare = _best_interleaved(repeats, evaluation, bare)
    return {"arch": arch, "images": len(images), "resolution": side, "batch_size": batch_size,
            "eval_images_per_s": round(len(images) / t_eval, 1),
            "bare_forward_images_per_s": round(len(images) / t_bare, 1),
            "overhead": round(t_eval / t_bare, 3)}


def bench_knn(n_train: int, n_test: int, dim: int, n_classes: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(n_train, dim, generator=gen), dim=1)
    test = torch.nn.functional.normalize(torch.randn(n_test, dim, generator=gen), dim=1)
    train_y = torch.randint(0, n_classes, (n_train,), generator=gen)
    test_y = torch.randint(0, n_classes, (n_test,), generator=gen)
    batch = 1024

    def bare() -> None:
        for start in range(0, n_test, batch):
            test[start:start + batch] @ train.T

    def knn() -> None:
        knn_classify(train, train_y, test, test_y, ks=(10, 20), num_classes=n_classes, batch_size=batch)

    bare()
    t_knn, t_bare = _best_interleaved(repeats, knn, bare)
    return {"train": n_train, "test": n_test, "dim": dim, "classes": n_classes, "knn_s": round(t_knn, 3),
            "bare_matmul_s": round(t_bare, 3), "overhead": round(t_knn / t_bare, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ViT-S at 224 px, 5,000 images, 10k k-NN queries")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--knn-queries", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = args.arch or ("vit_small" if args.full else "vit_test")
    n_images = args.images or (5000 if args.full else 2000)
    resolution = args.resolution or (224 if args.full else 64)
    queries = args.knn_queries or (10000 if args.full else 2000)
    result = {
        "torch_threads": torch.get_num_threads(),
        "features": bench_features(arch, n_images, resolution, args.batch_size, args.repeats),
        "knn": bench_knn(50000, queries, 1024, 100, args.repeats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
