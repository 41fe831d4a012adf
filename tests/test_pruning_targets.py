"""Target presets, validation errors and target sparsities."""

from __future__ import annotations

import dataclasses

import pytest

from megashear.model_config import ModelConfig, get_preset
from megashear.pruning.targets import (
    make_target,
    target_sizes,
    target_sparsities,
    validate_target,
)

PAPER = ("head", "intermediate", "layer", "hidden")


def test_presets_from_llama2_7b():
    src = get_preset("llama2-7b")
    t13 = make_target(src, "sheared-llama-1.3b")
    assert (t13.num_layers, t13.hidden_size, t13.num_attention_heads, t13.num_query_groups,
            t13.ffn_hidden_size, t13.vocab_size, t13.head_dim) == (24, 2048, 16, 16, 5504, 32000,
                                                                   128)  # fmt: skip
    assert t13.kv_channels is None  # 2048 / 16 = 128 already
    assert (
        t13.num_parameters()
        == ModelConfig(24, 2048, 16, 16, 5504, 32000, kv_channels=128).num_parameters()
    )
    t27 = make_target(src, "sheared-llama-2.7b")
    assert (t27.num_layers, t27.hidden_size, t27.num_attention_heads, t27.ffn_hidden_size) == (
        32, 2560, 20, 6912)  # fmt: skip
    t370 = make_target(src, "sheared-llama-370m")
    assert (t370.num_layers, t370.hidden_size, t370.num_attention_heads, t370.ffn_hidden_size) == (
        24, 1024, 8, 2816)  # fmt: skip
    for t in (t13, t27, t370):
        validate_target(src, t, strict_head_dim=True)
        assert t.rotary_base == src.rotary_base and t.norm_epsilon == src.norm_epsilon


def test_fields_override_preset_and_kv_channels_when_needed():
    src = get_preset("llama2-7b")
    t = make_target(src, "sheared-llama-1.3b", hidden_size=1920)
    assert t.hidden_size == 1920 and t.num_attention_heads == 16
    assert t.kv_channels == 128 and t.head_dim == 128
    t = make_target(src, num_layers=30)  # fields only; the rest from the source
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size) == (30, 4096, 11008)
    with pytest.raises(ValueError, match="unknown target preset"):
        make_target(src, "sheared-llama-7b")


def test_gqa_presets_keep_the_source_group_ratio():
    t = make_target(get_preset("llama3-8b"), "sheared-llama-1.3b")  # 32 heads / 8 groups
    assert (t.num_attention_heads, t.num_query_groups, t.vocab_size) == (16, 4, 128256)
    t = make_target(get_preset("llama2-70b"), "sheared-llama-1.3b")  # 64 / 8
    assert (t.num_attention_heads, t.num_query_groups) == (16, 2)
    t = make_target(get_preset("llama3-8b"), "sheared-llama-1.3b", num_query_groups=8)
    validate_target(get_preset("llama3-8b"), t)
    with pytest.raises(ValueError, match="heads per group"):
        make_target(get_preset("llama2-70b"), "sheared-llama-2.7b")  # 20 heads, ratio 8


def test_target_sparsities_7b():
    src = get_preset("llama2-7b")
    t = target_sparsities(src, make_target(src, "sheared-llama-1.3b"), PAPER)
    assert t == pytest.approx({"layer": 0.25, "head": 0.5, "intermediate": 0.5, "hidden": 0.5})
    t = target_sparsities(src, make_target(src, "sheared-llama-2.7b"), (*PAPER, "mlp"))
    assert t == pytest.approx(
        {"layer": 0.0, "head": 0.375, "intermediate": 1 - 6912 / 11008, "hidden": 0.375, "mlp": 0}
    )
    assert target_sizes(make_target(src, "sheared-llama-1.3b"), PAPER) == {
        "head": 16, "intermediate": 5504, "layer": 24, "hidden": 2048}  # fmt: skip


def test_target_sparsities_need_a_kind_for_each_shrunk_dim():
    src = get_preset("llama2-7b")
    tgt = make_target(src, "sheared-llama-1.3b")
    with pytest.raises(ValueError, match="shrinks head"):
        target_sparsities(src, tgt, ("intermediate", "layer", "hidden"))
    with pytest.raises(ValueError, match="fewer layers"):
        target_sparsities(src, tgt, ("head", "intermediate", "hidden", "head_layer"))
    assert "mlp" in target_sparsities(
        src, tgt, ("head", "intermediate", "hidden", "head_layer", "mlp")
    )
    with pytest.raises(ValueError, match="unknown mask kinds"):
        target_sparsities(src, tgt, ("heads",))


SRC = ModelConfig(4, 64, 8, 4, 160, 256)  # GQA, hn 8, 2 heads per group
OK = ModelConfig(2, 32, 4, 2, 96, 256, kv_channels=8)
TP2 = dict(tp_sizes=(2,))


@pytest.mark.parametrize(
    "change,kwargs,match",
    [
        (dict(num_layers=5), {}, "target layers 5 is larger"),
        (dict(hidden_size=80), {}, "target hidden size 80 is larger"),
        (dict(num_attention_heads=10, num_query_groups=5), {}, "attention heads 10 is larger"),
        (dict(ffn_hidden_size=200), {}, "FFN size 200 is larger"),
        (dict(num_attention_heads=6, num_query_groups=6), {}, "query groups 6 is larger"),
        (dict(vocab_size=300), {}, "target vocab"),
        (dict(kv_channels=16), {}, "head dim"),
        (dict(num_attention_heads=6, num_query_groups=4), {}, "do not divide"),
        (dict(num_attention_heads=8, num_query_groups=2), {}, "4 heads per group, more than"),
        (dict(num_layers=0), {}, "must be positive"),
        (dict(num_attention_heads=3, num_query_groups=3), TP2, "heads 3 not divisible by TP 2"),
        (dict(num_query_groups=1, num_attention_heads=2), TP2, "query groups 1 not divisible"),
        (dict(ffn_hidden_size=91), dict(tp_sizes=(1, 2)), "FFN size 91 not divisible by TP 2"),
        (dict(num_layers=3), dict(pp_sizes=(2,)), "layers 3 not divisible by PP 2"),
        (dict(hidden_size=40), dict(strict_head_dim=True), "hidden 40 != heads 4 x head dim 8"),
    ],
)  # fmt: skip
def test_validate_target_errors(change, kwargs, match):
    validate_target(SRC, OK, tp_sizes=(1, 2), pp_sizes=(1, 2))  # the base target is fine
    with pytest.raises(ValueError, match=match) as info:
        validate_target(SRC, dataclasses.replace(OK, **change), **kwargs)
    assert "\n" not in str(info.value)
