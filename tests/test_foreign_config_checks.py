"""Values read from Hugging Face ``config.json`` and Meta ``params.json`` are checked the way run
settings are: sizes are positive integers, epsilon and the RoPE base (and the llama3 scaling
factors) finite numbers above 0, switches true or false, the query heads a multiple of the
key/value heads. A bad value is one line naming the file and the key, never a silent conversion
(``float("1e-5")``, ``bool("false")``, ``0 or heads``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from megashear.conversion.hf import ConversionError, config_from_hf
from megashear.conversion.meta import config_from_params
from megashear.model_config import ModelConfig, check_model_values, get_preset

HF_BASE = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


def _hf(tmp_path: Path, **overrides) -> str:
    (tmp_path / "config.json").write_text(json.dumps({**HF_BASE, **overrides}))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer, got 0"),
        ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer, got -2"),
        ({"intermediate_size": 128.0}, "intermediate_size must be a positive integer, got 128.0"),
        ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"num_key_value_heads": 3},
         "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        ({"head_dim": 0}, "head_dim must be a positive integer, got 0"),
        ({"pretraining_tp": 0}, "pretraining_tp must be a positive integer, got 0"),
        ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number above 0, got 0"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps must be a finite number above 0, got -1e-05"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a finite number above 0, got '1e-5'"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps must be a finite number above 0, got nan"),
        ({"rope_theta": 0}, "rope_theta must be a finite number above 0, got 0"),
        ({"rope_theta": math.inf}, "rope_theta must be a finite number above 0, got inf"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
         "rope_theta must be a finite number above 0, got -1.0"),
        ({"rope_parameters": {**LLAMA3, "factor": 0.0}}, "rope factor must be a finite number"),
        ({"rope_parameters": {**LLAMA3, "low_freq_factor": "1"}},
         "rope low_freq_factor must be a finite number above 0, got '1'"),
        ({"rope_parameters": {**LLAMA3, "original_max_position_embeddings": 8192.5}},
         "rope original_max_position_embeddings must be a positive integer, got 8192.5"),
        ({"rope_parameters": {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
         "rope_high_freq_factor=4.0 must be above rope_low_freq_factor=4.0"),
        ({"tie_word_embeddings": "false"},
         "tie_word_embeddings must be true or false, got 'false'"),
        ({"hidden_size": 66},
         "hidden_size=66 is not a multiple of num_attention_heads=4 (and head_dim is not given)"),
        ({"head_dim": 15}, "head_dim=15 must be even"),
    ],
)  # fmt: skip
def test_bad_hf_value_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConversionError) as info:
        config_from_hf(_hf(tmp_path, **overrides))
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith(os.path.join(str(tmp_path), "config.json"))


def test_good_hf_values_are_read_as_given(tmp_path):
    """Null means transformers' default; every other value is taken exactly as written."""
    # an explicit head_dim needs no width that divides by the heads
    assert config_from_hf(_hf(tmp_path, hidden_size=66, head_dim=16)).head_dim == 16
    cfg = config_from_hf(
        _hf(tmp_path, num_key_value_heads=None, head_dim=None, rms_norm_eps=None, rope_theta=5e5)
    )
    assert (cfg.num_query_groups, cfg.head_dim, cfg.norm_epsilon, cfg.rotary_base) == (
        HF_BASE["num_attention_heads"],
        HF_BASE["hidden_size"] // HF_BASE["num_attention_heads"],
        1e-6,
        5e5,
    )
    cfg = config_from_hf(_hf(tmp_path, rms_norm_eps=1e-5, rope_parameters=LLAMA3))
    assert (
        cfg.norm_epsilon,
        cfg.rope_scaling_factor,
        cfg.rope_original_max_position_embeddings,
    ) == (
        1e-5,
        LLAMA3["factor"],
        LLAMA3["original_max_position_embeddings"],
    )


PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
          "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": None}, "dim is missing"),
        ({"n_layers": 0}, "n_layers must be a positive integer, got 0"),
        ({"n_heads": "4"}, "n_heads must be a positive integer, got '4'"),
        ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer, got 0"),
        ({"n_kv_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
        ({"multiple_of": 0}, "multiple_of must be a positive integer, got 0"),
        ({"ffn_dim_multiplier": -1.3}, "ffn_dim_multiplier must be a finite number above 0"),
        ({"norm_eps": 0.0}, "norm_eps must be a finite number above 0, got 0.0"),
        ({"rope_theta": math.nan}, "rope_theta must be a finite number above 0, got nan"),
        ({"max_seq_len": -1}, "max_seq_len must be a positive integer, got -1"),
        ({"use_scaled_rope": "yes"}, "use_scaled_rope must be true or false, got 'yes'"),
        ({"dim": 66}, "dim=66 is not a multiple of n_heads=4"),
        ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "rope_scaling_factor must be a"),
    ],
)  # fmt: skip
def test_bad_meta_value_is_one_line(change, message):
    params = {**PARAMS, **change}
    params = {k: v for k, v in params.items() if not (k == "dim" and v is None)}
    with pytest.raises(ConversionError) as info:
        config_from_params(params, "META/params.json", 256, tied=False)
    text = str(info.value)
    assert text.startswith("META/params.json: ") and message in text and "\n" not in text


def test_good_meta_values_are_read_as_given():
    cfg = config_from_params({**PARAMS, "vocab_size": -1}, "params.json", 300, tied=True)
    assert (cfg.vocab_size, cfg.num_query_groups, cfg.norm_epsilon, cfg.tie_word_embeddings) == (
        300,
        PARAMS["n_kv_heads"],
        PARAMS["norm_eps"],
        True,
    )
    scaled = config_from_params({**PARAMS, "use_scaled_rope": True}, "params.json", 256, False)
    assert scaled.rope_scaling == "llama3" and scaled.rope_scaling_factor == 8.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
        ({"kv_channels": 0}, "kv_channels must be a positive integer, got 0"),
        ({"norm_epsilon": -1.0}, "norm_epsilon must be a finite number above 0"),
        ({"rotary_base": math.inf}, "rotary_base must be a finite number above 0, got inf"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings must be true or false, got 1"),
        ({"num_query_groups": 3}, "is not a multiple of num_query_groups=3"),
        ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4"),
        ({"kv_channels": 15}, "head_dim=15 must be even"),
    ],
)  # fmt: skip
def test_model_values(change, message):
    check_model_values(get_preset("tiny-gqa"))
    check_model_values(get_preset("llama3.2-1b"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_model_values(dataclasses.replace(get_preset("tiny-gqa"), **change))
    assert isinstance(get_preset("tiny-gqa"), ModelConfig)


@pytest.mark.parametrize(
    "direction, bad, message",
    [
        (["--direction=hf-to-megatron"], {"rms_norm_eps": -1.0}, "rms_norm_eps must be a finite"),
        (["hf-to-megatron"], {"rope_theta": 0}, "config.json"),
        (["hf-to-megatron"], {"hidden_size": 66}, "config.json"),
        (["hf-to-megatron"], {"num_key_value_heads": 3}, "config.json"),
    ],
)
def test_bad_hf_value_through_the_command_is_one_line(tmp_path, capfd, direction, bad, message):
    """``megashear convert`` (the direction as a flag or as a word): a bad value (epsilon, RoPE
    base, shape) is one ``error:`` line, exit code 2, and nothing written."""
    from megashear.cli import main

    (tmp_path / "hf").mkdir()
    _hf(tmp_path / "hf", **bad)
    saved = dict(os.environ)
    try:
        code = main(["convert", *direction, f"--load={tmp_path / 'hf'}",
                     f"--save={tmp_path / 'out'}"])  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert code == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error: ") and message in err[-1]
    assert sum(ln.startswith("error:") for ln in err) == 1
    assert not (tmp_path / "out").exists()
