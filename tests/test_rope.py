"""Rotary inverse frequencies equal transformers' for plain RoPE and for Llama-3 scaling, and the
model installs them (megatron-core alone would hard-code low 1 / high 4 / original 8192)."""

from __future__ import annotations

import pytest
import torch

from megashear.model_config import ModelConfig, get_preset
from megashear.rope import rotary_inv_freq


def _transformers_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megashear.conversion.hf import hf_rope_parameters

    rope = hf_rope_parameters(cfg)
    hf = LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=max(cfg.seq_length, 2 * cfg.rope_original_max_position_embeddings),
        rope_parameters=rope,
    )
    fn = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    if fn is None:  # default RoPE has no entry in transformers 5's table
        hn = cfg.head_dim
        return 1.0 / (cfg.rotary_base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    return fn(hf, "cpu")[0]


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("llama3.1-8b"),  # factor 8
        get_preset("llama3.2-1b"),  # factor 32, head dim 64
        ModelConfig(2, 64, 4, rotary_base=5e5, rope_scaling="llama3", rope_scaling_factor=16.0,
                    rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                    rope_original_max_position_embeddings=1024),  # not megatron's constants
        get_preset("smollm2-135m"),  # plain, base 100000
    ],
    ids=["llama3.1", "llama3.2", "custom-llama3", "plain"],
)  # fmt: skip
def test_inverse_frequencies_equal_transformers(cfg):
    ours = rotary_inv_freq(cfg)
    theirs = _transformers_inv_freq(cfg).double()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    if cfg.rope_scaling == "llama3":
        plain = rotary_inv_freq(ModelConfig(**{**cfg.to_dict(), "rope_scaling": "none"}))
        assert not torch.allclose(ours, plain)  # the scaling really changes frequencies


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope_scaling 'yarn' is not supported"):
        ModelConfig(rope_scaling="yarn")
