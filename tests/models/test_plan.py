"""`vfm plan`'s numbers and refusals, from the real config sections."""
import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from models.flops import backbone_forward_flops
from models.plan import GIB, PlanDoesNotFit, plan_model, render_plan
from pipeline.config.model import ModelConfig
from pipeline.config.train import TrainConfig

SEVEN_B = ModelConfig(arch="vit_7b", global_crop_size=256, local_crop_size=112, n_local_crops=8,
                      activation_checkpointing=True)


def test_local_preset_plan_counts_parameters_and_fits() -> None:
    plan = plan_model(ModelConfig(), TrainConfig(), nodes=1, gpus_per_node=1)
    assert plan["parameters"] == {"backbone": 112_960, "dino_head": 14_496, "ibot_head": 14_496, "total": 141_952}
    assert plan["crops"]["tokens_per_image"] == 2 * (1 + 2 + 16) + 4 * (1 + 2 + 4)
    assert 0 < plan["gflops_per_image"]["student_forward"] < plan["gflops_per_image"]["train_step"]
    text = render_plan(plan)
    assert "params backbone" in text and "112,960" in text and "GiB/GPU total" in text


def test_seven_b_counts_and_zero3_model_states_come_from_deepspeed() -> None:
    train = TrainConfig(zero_stage=3, precision="bf16", micro_batch_per_gpu=16)
    plan = plan_model(SEVEN_B, train, nodes=32, gpus_per_node=8)
    assert plan["parameters"]["backbone"] == 6_716_043_264
    assert plan["global_batch"] == 4096
    # The largest "layer" is the DINO head's 512 x 262,144 prototype matrix.
    _, gpu, _ = estimate_zero3_model_states_mem_needs(plan["parameters"]["total"], 512 * 262_144, 8, 32,
                                                      cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert plan["memory_gib_per_gpu"]["model_states"] == pytest.approx(gpu / GIB, abs=1e-3)
    # One global crop through the backbone: ~2 FLOPs per parameter per token, plus attention.
    per_crop = backbone_forward_flops(SEVEN_B.vit_spec(), 256)
    assert 2 * 6.7e9 * 261 < per_crop < 1.1 * 2 * 6.7e9 * 261


def test_more_sharding_and_checkpointing_need_less_memory() -> None:
    big = SEVEN_B.model_copy(update={"activation_checkpointing": False})
    budget = {"gpu_memory_gib": 10_000.0, "precision": "bf16"}
    stage0 = plan_model(big, TrainConfig(zero_stage=0, **budget), 4, 8)["memory_gib_per_gpu"]
    stage3 = plan_model(big, TrainConfig(zero_stage=3, **budget), 4, 8)["memory_gib_per_gpu"]
    checkpointed = plan_model(SEVEN_B, TrainConfig(zero_stage=3, **budget), 4, 8)["memory_gib_per_gpu"]
    assert stage3["model_states"] < stage0["model_states"] / 10
    assert stage3["teachers"] < stage0["teachers"] / 10
    assert checkpointed["activations"] < stage3["activations"] / 3


def test_a_plan_that_cannot_fit_is_refused_with_the_reason() -> None:
    with pytest.raises(PlanDoesNotFit, match=r"vit_7b needs \d+\.\d GiB per GPU .* but train.gpu_memory_gib is 80"):
        plan_model(SEVEN_B, TrainConfig(zero_stage=0, precision="bf16"), nodes=1, gpus_per_node=8)


@pytest.mark.parametrize(
    "model, train, message",
    [
        (ModelConfig(global_crop_size=30), TrainConfig(), "model.global_crop_size 30 is not a multiple of the patch size 8"),
        (ModelConfig(), TrainConfig(offload_params=True, zero_stage=2), "offload_params needs train.zero_stage 3"),
        (ModelConfig(), TrainConfig(offload_optimizer=True), "offload_optimizer needs train.zero_stage 1, 2 or 3"),
    ],
)
def test_impossible_settings_are_named(model: ModelConfig, train: TrainConfig, message: str) -> None:
    with pytest.raises(PlanDoesNotFit, match=message):
        plan_model(model, train)
