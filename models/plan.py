"""`vfm plan`: parameter counts, FLOPs per image and memory per GPU of a configured model and training setup,
and a refusal with the reason when the plan cannot fit. Counts come from the model built on the meta device;
model-state memory from DeepSpeed's estimators fed with those counts (its *_all_live variants read 0 on meta)."""
from typing import Any, Protocol

from torch import nn

from models.flops import backbone_forward_flops, head_forward_flops, n_tokens
from models.heads import HeadSpec, build_head
from models.registry import build_from_spec, count_parameters
from models.vision_transformer import ViTSpec

GIB = 2**30
# iBOT masks half of the global-crop images, at ratios spread over [0.1, 0.5]: 0.5 * 0.3 of the patches on average.
EXPECTED_MASKED_FRACTION = 0.15
# Bytes kept for the backward pass per token, per unit of width, per block, with 16-bit activations and attention
# through SDPA (no N x N scores stored): the 34*s*b*h of Korthikanti et al. 2022, "Reducing Activation Recomputation".
ACTIVATION_BYTES_PER_TOKEN_DIM = 34
# CUDA context, kernels and allocator fragmentation, per GPU.
RUNTIME_OVERHEAD_GIB = 2.0


class PlanDoesNotFit(ValueError):
    """The plan cannot run as configured; the message is one line with the reason."""


class ModelSettings(Protocol):
    arch: str
    global_crop_size: int
    local_crop_size: int
    n_global_crops: int
    n_local_crops: int

    def vit_spec(self) -> ViTSpec: ...

    def head_specs(self) -> tuple[HeadSpec, HeadSpec]: ...


class TrainSettings(Protocol):
    zero_stage: int
    precision: str
    micro_batch_per_gpu: int
    offload_optimizer: bool
    offload_params: bool
    gpu_memory_gib: float


def _largest_layer(modules: list[nn.Module]) -> int:
    """DeepSpeed's notion of a layer: the parameters one module holds itself."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for root in modules for m in root.modules())


def _model_state_bytes(n_params: int, largest_layer: int, train: TrainSettings, nodes: int, gpus_per_node: int) -> tuple[int, int]:
    """(per-GPU bytes, per-node CPU bytes) of the trained model's parameters, gradients and Adam states."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    world = nodes * gpus_per_node
    if train.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            n_params, largest_layer, gpus_per_node, nodes,
            cpu_offload=train.offload_optimizer, cpu_offload_params=train.offload_params, zero_init=True,
        )
        return gpu, cpu
    if train.zero_stage == 0:
        # Nothing partitioned: the stage-2 count on one GPU.
        cpu, gpu = estimate_zero2_model_states_mem_needs(n_params, 1, 1, cpu_offload=False)
        return gpu, cpu
    cpu, gpu = estimate_zero2_model_states_mem_needs(n_params, gpus_per_node, nodes, cpu_offload=train.offload_optimizer)
    if train.zero_stage == 1:
        gpu += int(2 * n_params * (1 - 1 / world))  # stage 1 keeps the full 16-bit gradients on every GPU
    return gpu, cpu


def _check_settings(model: ModelSettings, spec: ViTSpec, train: TrainSettings, nodes: int, gpus_per_node: int) -> None:
    if nodes < 1 or gpus_per_node < 1:
        raise PlanDoesNotFit(f"nodes ({nodes}) and gpus per node ({gpus_per_node}) must be at least 1")
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(model, name) % spec.patch_size:
            raise PlanDoesNotFit(f"model.{name} {getattr(model, name)} is not a multiple of the patch size {spec.patch_size}")
    if train.offload_params and train.zero_stage != 3:
        raise PlanDoesNotFit(f"train.offload_params needs train.zero_stage 3, not {train.zero_stage}")
    if train.offload_optimizer and train.zero_stage == 0:
        raise PlanDoesNotFit("train.offload_optimizer needs train.zero_stage 1, 2 or 3")


def plan_model(model: ModelSettings, train: TrainSettings, nodes: int = 1, gpus_per_node: int = 1) -> dict[str, Any]:
    """The plan as a JSON-ready dict; raises PlanDoesNotFit when the estimate per GPU exceeds train.gpu_memory_gib."""
    spec = model.vit_spec()
    dino_spec, ibot_spec = model.head_specs()
    _check_settings(model, spec, train, nodes, gpus_per_node)
    world = nodes * gpus_per_node
    backbone = build_from_spec(spec, device="meta")
    dino_head = build_head(spec.embed_dim, dino_spec, device="meta")
    ibot_head = build_head(spec.embed_dim, ibot_spec, device="meta")
    n_backbone, n_dino, n_ibot = (count_parameters(m) for m in (backbone, dino_head, ibot_head))
    n_student = n_backbone + n_dino + n_ibot

    # ---- FLOPs per image, for its whole crop set
    masked_per_global = EXPECTED_MASKED_FRACTION * (model.global_crop_size // spec.patch_size) ** 2
    n_crops = model.n_global_crops + model.n_local_crops
    global_backbone = model.n_global_crops * backbone_forward_flops(spec, model.global_crop_size)
    heads_on_globals = model.n_global_crops * (
        head_forward_flops(spec.embed_dim, dino_spec) + masked_per_global * head_forward_flops(spec.embed_dim, ibot_spec)
    )
    student_forward = (global_backbone + model.n_local_crops * backbone_forward_flops(spec, model.local_crop_size)
                       + heads_on_globals + model.n_local_crops * head_forward_flops(spec.embed_dim, dino_spec))
    teacher_forward = global_backbone + heads_on_globals
    # Backward is twice the forward; activation checkpointing runs the student forward once more.
    student_passes = 4 if spec.activation_checkpointing else 3
    train_step = student_passes * student_forward + teacher_forward

    # ---- memory per GPU
    model_states_gpu, model_states_cpu = _model_state_bytes(
        n_student, _largest_layer([backbone, dino_head, ibot_head]), train, nodes, gpus_per_node
    )
    # EMA teacher in fp32 (EMA steps vanish in bf16); the frozen Gram teacher in the training precision. Both are
    # partitioned like the student under ZeRO-3 and kept on the CPU with offload_params.
    element_bytes = 2 if train.precision == "bf16" else 4
    teacher_bytes = 4 * n_student + element_bytes * n_backbone
    teachers_gpu = 0 if train.offload_params else teacher_bytes // (world if train.zero_stage == 3 else 1)
    tokens = model.n_global_crops * n_tokens(spec, model.global_crop_size) + model.n_local_crops * n_tokens(spec, model.local_crop_size)
    per_block = ACTIVATION_BYTES_PER_TOKEN_DIM * (element_bytes / 2) * tokens * spec.embed_dim
    if spec.activation_checkpointing:
        # Only block inputs stay; one block's internals live during its recomputation.
        block_bytes = spec.depth * element_bytes * tokens * spec.embed_dim + per_block
    else:
        block_bytes = spec.depth * per_block
    # fp32 logits, their log-softmax and its gradient for every DINO crop token and iBOT masked patch.
    head_bytes = 3 * 4 * (n_crops * dino_spec.n_prototypes + model.n_global_crops * masked_per_global * ibot_spec.n_prototypes)
    activations = int(train.micro_batch_per_gpu * (block_bytes + head_bytes))
    total_gpu = model_states_gpu + teachers_gpu + activations + RUNTIME_OVERHEAD_GIB * GIB

    plan = {
        "arch": model.arch,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "zero_stage": train.zero_stage,
        "precision": train.precision,
        "micro_batch_per_gpu": train.micro_batch_per_gpu,
        "global_batch": train.micro_batch_per_gpu * world,
        "parameters": {"backbone": n_backbone, "dino_head": n_dino, "ibot_head": n_ibot, "total": n_student},
        "crops": {"global": [model.n_global_crops, model.global_crop_size], "local": [model.n_local_crops, model.local_crop_size],
                  "tokens_per_image": tokens},
        "gflops_per_image": {"student_forward": round(student_forward / 1e9, 3),
                             "teacher_forward": round(teacher_forward / 1e9, 3),
                             "train_step": round(train_step / 1e9, 3),
                             "gram_teacher_forward": round(global_backbone / 1e9, 3)},
        "memory_gib_per_gpu": {
            "model_states": round(model_states_gpu / GIB, 3),
            "teachers": round(teachers_gpu / GIB, 3),
            "activations": round(activations / GIB, 3),
            "runtime_overhead": RUNTIME_OVERHEAD_GIB,
            "total": round(total_gpu / GIB, 3),
            "budget": train.gpu_memory_gib,
        },
        "memory_gib_cpu_per_node": round((model_states_cpu + (teacher_bytes // nodes if train.offload_params else 0)) / GIB, 3),
    }
    if total_gpu / GIB > train.gpu_memory_gib:
        mem = plan["memory_gib_per_gpu"]
        raise PlanDoesNotFit(
            f"{model.arch} needs {mem['total']:.1f} GiB per GPU (model states {mem['model_states']:.1f}, teachers "
            f"{mem['teachers']:.1f}, activations {mem['activations']:.1f}, overhead {RUNTIME_OVERHEAD_GIB:.1f}) but "
            f"train.gpu_memory_gib is {train.gpu_memory_gib:g}; try a higher train.zero_stage, more GPUs, "
            "offloading, a smaller train.micro_batch_per_gpu or model.activation_checkpointing"
        )
    return plan


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def render_plan(plan: dict[str, Any]) -> str:
    """A text table of a plan_model() dict."""
    params, flops, mem = plan["parameters"], plan["gflops_per_image"], plan["memory_gib_per_gpu"]
    rows = [
        ("arch", plan["arch"]),
        ("setup", f"{plan['nodes']} node(s) x {plan['gpus_per_node']} GPU(s), ZeRO-{plan['zero_stage']}, {plan['precision']}"),
        ("batch", f"{plan['micro_batch_per_gpu']} per GPU, {plan['global_batch']} global"),
        ("crops", f"{plan['crops']['global'][0]} x {plan['crops']['global'][1]}px global + "
                  f"{plan['crops']['local'][0]} x {plan['crops']['local'][1]}px local = {plan['crops']['tokens_per_image']} tokens"),
        ("params backbone", f"{_count(params['backbone'])} ({params['backbone']:,})"),
        ("params DINO head", f"{_count(params['dino_head'])} ({params['dino_head']:,})"),
        ("params iBOT head", f"{_count(params['ibot_head'])} ({params['ibot_head']:,})"),
        ("params total", f"{_count(params['total'])} ({params['total']:,})"),
        ("GFLOPs/img student fwd", f"{flops['student_forward']:.2f}"),
        ("GFLOPs/img teacher fwd", f"{flops['teacher_forward']:.2f}"),
        ("GFLOPs/img train step", f"{flops['train_step']:.2f} (+{flops['gram_teacher_forward']:.2f} in the Gram phase)"),
        ("GiB/GPU model states", f"{mem['model_states']:.2f}"),
        ("GiB/GPU teachers", f"{mem['teachers']:.2f}"),
        ("GiB/GPU activations", f"{mem['activations']:.2f}"),
        ("GiB/GPU overhead", f"{mem['runtime_overhead']:.2f}"),
        ("GiB/GPU total", f"{mem['total']:.2f} of {mem['budget']:g}"),
        ("GiB CPU per node", f"{plan['memory_gib_cpu_per_node']:.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
