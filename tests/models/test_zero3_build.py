"""The backbone builds under deepspeed.zero.Init (parameters partitioned at construction) and the NaN-fill +
explicit init reaches every partitioned parameter. Runs in a child process: DeepSpeed's process group and its
JIT-built op stay out of the test process (first build ~1-2 min; kept under .cache/torch_extensions)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
from models import DinoVisionTransformer, backbone_spec, build_backbone
from models.registry import init_partitioned
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
# The dtype comes from the config (neither fp16 nor bf16: float32). Not from dtype=: DeepSpeed 0.19.8's
# zero.Init ignores it where the accelerator has no fp16 (a CPU without AVX512-FP16 or AMX-FP16) and
# builds bfloat16 parameters
with deepspeed.zero.Init(config_dict_or_path=config):
    model = DinoVisionTransformer(backbone_spec("vit_test"))
assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters()), "not partitioned at construction"
assert all(p.dtype == torch.float32 for p in model.parameters()), {p.dtype for p in model.parameters()}
init_partitioned(model)
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_backbone("vit_test").parameters())
    assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 64)
print("ok")
"""


@pytest.mark.slow
def test_backbone_builds_and_initialises_under_zero3_init() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
