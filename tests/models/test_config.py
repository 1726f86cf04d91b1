"""The model and train config sections: strict, and in step with the model registry."""
import typing

import pydantic
import pytest

from models import ARCHS, HEADS
from pipeline.config.model import ArchName, ModelConfig
from pipeline.config.train import TrainConfig


def test_arch_names_match_the_registry() -> None:
    assert set(typing.get_args(ArchName)) == set(ARCHS)


def test_unset_fields_take_the_arch_preset_and_set_ones_replace_it() -> None:
    assert ModelConfig(arch="vit_7b").vit_spec() == ARCHS["vit_7b"]
    assert ModelConfig(arch="vit_7b").head_specs() == HEADS["vit_7b"]
    tuned = ModelConfig(arch="vit_small", drop_path=0.2, ffn="swiglu", ffn_hidden_dim=1024, n_storage_tokens=0,
                        dino_prototypes=4096, activation_checkpointing=True)
    spec = tuned.vit_spec()
    assert (spec.drop_path, spec.ffn, spec.ffn_hidden_dim, spec.n_storage_tokens, spec.activation_checkpointing) == (
        0.2, "swiglu", 1024, 0, True)
    assert tuned.head_specs()[0].n_prototypes == 4096
    assert tuned.head_specs()[1] == HEADS["vit_small"][1]


def test_every_field_is_documented_and_typos_are_errors() -> None:
    for section in (ModelConfig, TrainConfig):
        assert all(field.description for field in section.model_fields.values()), section.__name__
    with pytest.raises(pydantic.ValidationError, match="drop_pth"):
        ModelConfig(drop_pth=0.1)
    with pytest.raises(pydantic.ValidationError, match="zero_stage"):
        TrainConfig(zero_stage=4)
