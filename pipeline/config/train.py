"""Config of training, as far as `vfm plan` needs it now: how the model is sharded, in what precision, and the
per-GPU memory a plan must fit in. The training stage extends this section."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.base import Section


class TrainConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage: 0 replicates everything, 1 "
                                                           "partitions optimizer states, 2 also gradients, 3 also "
                                                           "parameters (and the teachers).")
    precision: Literal["bf16", "fp32"] = Field("fp32", description="Training precision: bf16 mixed precision "
                                                                   "(fp32 master weights) or plain fp32.")
    micro_batch_per_gpu: int = Field(8, ge=1, description="Images per GPU per step, each with its full crop set.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states (and fp32 master weights) in CPU "
                                                       "memory; needs zero_stage >= 1.")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory between uses; needs zero_stage 3.")
    gpu_memory_gib: float = Field(80.0, gt=0.0, description="Memory of one GPU in GiB; `vfm plan` refuses a plan "
                                                            "whose estimate per GPU exceeds it.")
