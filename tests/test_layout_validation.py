"""Bad parallel layouts and model shapes are refused with one-line errors, before any work."""

from __future__ import annotations

import pytest

from megashear.checkpoint.format import CheckpointError, check_model_config
from megashear.config import ParallelConfig
from megashear.model_config import ModelConfig, get_preset
from megashear.models.llama import validate_layout


@pytest.mark.parametrize(
    ("cfg", "par", "world", "message"),
    [
        (get_preset("tiny-mha"), ParallelConfig(tp=2, pp=2), 6, "does not divide the world size 6"),
        (get_preset("tiny-mha"), ParallelConfig(tp=3), 3, "num_attention_heads=4 is not divisible"),
        (ModelConfig(num_layers=3), ParallelConfig(pp=2), 2, "num_layers=3 is not divisible"),
        (get_preset("tiny-gqa"), ParallelConfig(tp=4), 4, "num_query_groups=2 is not divisible"),
        (
            ModelConfig(
                vocab_size=32001, num_attention_heads=3, num_query_groups=3, ffn_hidden_size=96
            ),
            ParallelConfig(tp=3),
            3,
            "padded vocabulary 32128 .* not divisible by tensor parallel size 3",
        ),
        (get_preset("tiny-mha"), ParallelConfig(vpp=2), 1, "need pp >= 2"),
        (get_preset("tiny-mha"), ParallelConfig(pp=2, vpp=4), 2, "pp=2 x vpp=4"),
        (
            get_preset("tiny-mha"),
            ParallelConfig(sequence_parallel=True),
            1,
            "sequence_parallel needs tp >= 2",
        ),
        (
            ModelConfig(seq_length=33),
            ParallelConfig(tp=2, sequence_parallel=True),
            2,
            "seq_length=33 is not divisible by tensor parallel size 2",
        ),
    ],
)
def test_bad_layouts_are_refused(cfg, par, world, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_layout(cfg, par, world)
    assert "\n" not in str(info.value)


def test_good_layouts_pass():
    validate_layout(get_preset("llama2-70b"), ParallelConfig(tp=8, pp=4), 64)
    validate_layout(get_preset("tiny-gqa"), ParallelConfig(tp=2, pp=2, vpp=2), 8)


def test_checkpoint_of_another_shape_names_the_field():
    saved = {"model": get_preset("tiny-mha").to_dict()}
    check_model_config(saved, get_preset("tiny-mha"), "ckpt")
    with pytest.raises(CheckpointError, match="ffn_hidden_size: checkpoint 160 != config 128"):
        check_model_config(saved, ModelConfig(ffn_hidden_size=128, num_layers=4), "ckpt")


def test_presets_have_the_published_parameter_counts():
    assert get_preset("llama2-7b").num_parameters() == 6_738_415_616
    assert get_preset("llama2-13b").num_parameters() == 13_015_864_320
    assert get_preset("llama2-70b").num_parameters() == 68_976_648_192
    assert get_preset("llama3-8b").num_parameters() == 8_030_261_248


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="unknown model config keys \\['hiden_size'\\]"):
        ModelConfig.from_dict({"hiden_size": 5})
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("llama9")
