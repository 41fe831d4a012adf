"""LLaMA model shapes: the dataclass every part of megashear agrees on, and named presets.

A shape is the architecture only (no parallel layout, no training settings). All LLaMA variants
here use RMSNorm, SwiGLU, rotary embeddings, no biases and untied input/output embeddings.
The head dimension is ``hidden_size // num_attention_heads`` unless ``kv_channels`` is given,
which pruned models need (a pruned model keeps the source head dim while hidden shrinks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Architecture of a LLaMA model.

    Attributes:
        num_layers: transformer layers.
        hidden_size: model width ``h``.
        num_attention_heads: query heads ``a``.
        num_query_groups: key/value heads ``g`` (``a`` for MHA, fewer for GQA).
        ffn_hidden_size: SwiGLU intermediate width ``f``.
        vocab_size: tokenizer vocabulary ``v`` (unpadded).
        kv_channels: head dimension ``hn``; ``None`` means ``h // a``.
        seq_length: maximum sequence length ``s``.
        rotary_base: RoPE base (10000 for LLaMA2, 500000 for LLaMA3).
        norm_epsilon: RMSNorm epsilon.
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int = 160
    vocab_size: int = 256
    kv_channels: int | None = None
    seq_length: int = 64
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Per-head width ``hn``."""
        return (
            self.kv_channels
            if self.kv_channels is not None
            else (self.hidden_size // self.num_attention_heads)
        )

    @property
    def is_gqa(self) -> bool:
        return self.num_query_groups != self.num_attention_heads

    def num_parameters(self) -> int:
        """Total parameters: embeddings, LM head, norms, attention and SwiGLU MLP."""
        h, f, v, hn = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.head_dim
        a, g = self.num_attention_heads, self.num_query_groups
        attn = h * (a + 2 * g) * hn + a * hn * h
        mlp = 3 * h * f
        norms = 2 * h
        return self.num_layers * (attn + mlp + norms) + 2 * v * h + h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(
                f"unknown model config keys {sorted(unknown)}; allowed: {sorted(names)}"
            )
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(32, 4096, 32, 32, 11008, 32000, seq_length=4096),
    "llama2-13b": ModelConfig(40, 5120, 40, 40, 13824, 32000, seq_length=4096),
    "llama2-70b": ModelConfig(80, 8192, 64, 8, 28672, 32000, seq_length=4096),
    "llama3-8b": ModelConfig(32, 4096, 32, 8, 14336, 128256, seq_length=8192, rotary_base=500000.0),
    # Tiny shapes for tests and CPU runs.
    "tiny-mha": ModelConfig(4, 64, 4, 4, 160, 256, seq_length=64),
    "tiny-gqa": ModelConfig(4, 64, 4, 2, 160, 256, seq_length=64),
    "tiny-gqa-8h": ModelConfig(4, 64, 8, 4, 160, 256, seq_length=64),
}


def get_preset(name: str) -> ModelConfig:
    """Return a copy of a named model shape."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
