"""Forward+backward images/s of vfm's vit_small vs transformers' DINOv3ViTModel of the same size and weights, at
224 on CPU, in fp32 and under bf16 autocast. Prints one JSON object; ratio > 1 means vfm is faster.
Each rate comes from the fastest of the timed steps, both in wall-clock time and in the CPU time of this process
(all its threads): on a shared machine wall-clock steps also measure the neighbours, so the headline ratio_* uses
CPU time and ratio_*_wall is given beside it.

    .venv/bin/python bench/model.py            # short: batch 2, 5 timed steps per model and precision
    .venv/bin/python bench/model.py --full     # batch 16, 10 timed steps
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_backbone  # noqa: E402
from models.weights import export_backbone  # noqa: E402


def _ours_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    out = model.forward_features(images)
    (out["x_norm_patchtokens"].mean() + out["x_norm_clstoken"].mean()).backward()


def _hf_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    model(pixel_values=images).last_hidden_state.mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="batch 16 and 10 timed steps")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    batch, steps = (16, 10) if args.full else (2, 5)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import DINOv3ViTModel

    ours = build_backbone("vit_small").train()
    with tempfile.TemporaryDirectory() as tmp:
        export_backbone(ours, tmp, fmt="hf")  # same weights on both sides
        theirs = DINOv3ViTModel.from_pretrained(tmp, attn_implementation="sdpa").train()
    images = torch.randn(batch, 3, args.size, args.size)
    result: dict[str, object] = {"bench": "model", "arch": "vit_small", "image_size": args.size, "batch": batch,
                                 "steps": steps, "threads": torch.get_num_threads(), "device": "cpu"}
    for precision in ("fp32", "bf16"):
        wall: dict[str, list[float]] = {"vfm": [], "transformers": []}
        cpu: dict[str, list[float]] = {"vfm": [], "transformers": []}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for step in range(steps + 1):  # step 0 warms up
                # Alternate the two models so that machine noise hits both alike.
                for name, model, run in (("vfm", ours, _ours_step), ("transformers", theirs, _hf_step)):
                    model.zero_grad(set_to_none=True)
                    start_wall, start_cpu = time.perf_counter(), time.process_time()
                    run(model, images)
                    if step:
                        wall[name].append(time.perf_counter() - start_wall)
                        cpu[name].append(time.process_time() - start_cpu)
        for clock, seconds, suffix in ((cpu, "cpu", ""), (wall, "wall", "_wall")):
            ours_rate, theirs_rate = batch / min(clock["vfm"]), batch / min(clock["transformers"])
            result[f"vfm_{precision}_img_per_{seconds}_s"] = round(ours_rate, 3)
            result[f"transformers_{precision}_img_per_{seconds}_s"] = round(theirs_rate, 3)
            result[f"ratio_{precision}{suffix}"] = round(ours_rate / theirs_rate, 3)
    result["vfm_at_least_as_fast"] = all(result[f"ratio_{p}"] >= 1.0 for p in ("fp32", "bf16"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
