"""LLaMA model shapes: the dataclass every part of megashear agrees on, and named presets.

A shape is the architecture only (no parallel layout, no training settings). Every variant uses
RMSNorm, SwiGLU, rotary embeddings and no biases. What differs between the LLaMA families of
today is captured by a few fields:

- ``tie_word_embeddings``: one ``[v, h]`` matrix serves as the input embedding and the LM head
  (Llama-3.2-1B/3B, SmolLM2); it is stored and counted once.
- ``rope_scaling``: ``"none"`` or ``"llama3"`` (Llama-3.1/3.2/3.3), with its factor, low/high
  frequency factors and original context length, applied to the inverse frequencies exactly as
  transformers' ``rope_type: llama3`` does.
- ``make_vocab_size_divisible_by``: the embedding and output layer hold
  :attr:`ModelConfig.padded_vocab_size` rows (Megatron's vocabulary padding), so that any tensor
  parallel size that divides it can split them; the padded rows are zero and their logits never
  enter the softmax. Checkpoints store the padded rows; Hugging Face exports drop them. The
  padding depends on the model only, never on the layout, so a checkpoint loads at any TP.

The head dimension is ``hidden_size // num_attention_heads`` unless ``kv_channels`` is given,
which pruned models need (a pruned model keeps the source head dim while hidden shrinks).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

RopeScalingType = Literal["none", "llama3"]
"""The values of :attr:`ModelConfig.rope_scaling`."""
ROPE_SCALING_TYPES: tuple[str, ...] = typing.get_args(RopeScalingType)


@dataclass
class ModelConfig:
    """Architecture of a LLaMA model.

    Each field's docstring gives its meaning and its megatron, Hugging Face and Sheared-LLaMA
    names; ``megashear <command> --help`` shows them.
    """

    num_layers: int = 2
    """Transformer layers ``L`` (megatron --num-layers; HF num_hidden_layers; Sheared-LLaMA
    n_layers)."""
    hidden_size: int = 64
    """Model width ``h`` (megatron --hidden-size; Sheared-LLaMA d_model)."""
    num_attention_heads: int = 4
    """Query heads ``a`` (megatron --num-attention-heads; Sheared-LLaMA n_heads)."""
    num_query_groups: int | None = None
    """Key/value heads ``g`` (megatron --num-query-groups; HF num_key_value_heads); null: ``a``
    (MHA), fewer for GQA."""
    ffn_hidden_size: int = 160
    """SwiGLU intermediate width ``f`` (megatron --ffn-hidden-size; HF / Sheared-LLaMA
    intermediate_size)."""
    vocab_size: int = 256
    """Tokenizer vocabulary ``v``, unpadded (the padded row count is padded_vocab_size)."""
    kv_channels: int | None = None
    """Head dimension ``hn`` (megatron --kv-channels; HF head_dim); null: ``h // a``. Pruned
    models keep the source's."""
    seq_length: int = 64
    """Maximum sequence length ``s`` in tokens (megatron --seq-length); a training setting
    that changes no weight."""
    rotary_base: float = 10000.0
    """RoPE base (megatron --rotary-base; HF rope_theta): 10000 LLaMA2, 500000 LLaMA3, 100000
    SmolLM2."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon (megatron --norm-epsilon; HF rms_norm_eps)."""
    tie_word_embeddings: bool = False
    """The LM head is the input embedding matrix, stored once (HF tie_word_embeddings; megatron
    without --untie-embeddings-and-output-weights)."""
    rope_scaling: RopeScalingType = "none"
    """RoPE frequency scaling: none, or llama3 as Llama-3.1/3.2/3.3 (HF rope_scaling.rope_type)."""
    rope_scaling_factor: float = 8.0
    """llama3 ``factor`` (8 for Llama-3.1, 32 for Llama-3.2; megatron --rope-scaling-factor)."""
    rope_low_freq_factor: float = 1.0
    """llama3 ``low_freq_factor`` (HF rope_scaling.low_freq_factor)."""
    rope_high_freq_factor: float = 4.0
    """llama3 ``high_freq_factor`` (HF rope_scaling.high_freq_factor)."""
    rope_original_max_position_embeddings: int = 8192
    """llama3 ``original_max_position_embeddings``: the pre-scaling context length in tokens."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding and output rows to a multiple of this (megatron
    --make-vocab-size-divisible-by)."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.rope_scaling not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling {self.rope_scaling!r} is not supported; allowed: "
                f"{list(ROPE_SCALING_TYPES)}"
            )
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError(
                f"make_vocab_size_divisible_by must be >= 1, got {self.make_vocab_size_divisible_by}"
            )

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

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: ``v`` rounded up to the padding multiple."""
        m = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / m) * m

    def num_parameters(self) -> int:
        """Total parameters, as Hugging Face counts them: embeddings, LM head (once if tied),
        norms, attention and SwiGLU MLP; the vocabulary padding is not counted."""
        h, f, v, hn = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.head_dim
        a, g = self.num_attention_heads, self.num_query_groups
        attn = h * (a + 2 * g) * hn + a * hn * h
        mlp = 3 * h * f
        norms = 2 * h
        embeddings = (1 if self.tie_word_embeddings else 2) * v * h
        return self.num_layers * (attn + mlp + norms) + embeddings + h

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


# Fields that are sizes (at least 1) and floats that must be finite and above 0; a ModelConfig
# read from a foreign config (HF, Meta) is checked against them (:func:`check_model_values`).
POSITIVE_INT_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "vocab_size", "kv_channels", "seq_length", "rope_original_max_position_embeddings",
    "make_vocab_size_divisible_by",
)  # fmt: skip
POSITIVE_FLOAT_FIELDS = (
    "rotary_base", "norm_epsilon", "rope_scaling_factor", "rope_low_freq_factor",
    "rope_high_freq_factor",
)  # fmt: skip


def check_model_values(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` (one line naming the field) unless every value of ``cfg`` is one a
    model can have: sizes are integers of at least 1 (``kv_channels`` may be null), epsilon,
    RoPE base and RoPE scaling factors finite numbers above 0, ``tie_word_embeddings`` a bool,
    the query heads a multiple of the key/value heads, the width a multiple of the heads
    (unless ``kv_channels`` sets the head dimension), an even head dimension (RoPE rotates
    pairs) and, for llama3 RoPE scaling, the high
    frequency factor above the low one (transformers divides by their difference)."""
    for name in POSITIVE_INT_FIELDS:
        value = getattr(cfg, name)
        if name == "kv_channels" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in POSITIVE_FLOAT_FIELDS:
        value = getattr(cfg, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number above 0, got {value!r}")
    if not isinstance(cfg.tie_word_embeddings, bool):
        raise ValueError(
            f"tie_word_embeddings must be true or false, got {cfg.tie_word_embeddings!r}"
        )
    if cfg.num_attention_heads % cfg.num_query_groups:
        raise ValueError(
            f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
            f"num_query_groups={cfg.num_query_groups}"
        )
    if cfg.kv_channels is None and cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size={cfg.hidden_size} is not a multiple of "
            f"num_attention_heads={cfg.num_attention_heads} (and head_dim is not given)"
        )
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim={cfg.head_dim} must be even (RoPE rotates pairs of channels)")
    if cfg.rope_scaling == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
        raise ValueError(
            f"rope_high_freq_factor={cfg.rope_high_freq_factor} must be above "
            f"rope_low_freq_factor={cfg.rope_low_freq_factor}"
        )


# Fields that define the weights: two configs that differ in one of them are different models.
# ``seq_length`` is the only field a run may change on a given checkpoint.
WEIGHT_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "seq_length")


def model_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``field: a != b`` for every weight-defining field in which ``a`` and ``b`` differ."""
    out = []
    for name in WEIGHT_FIELDS:
        va, vb = getattr(a, name), getattr(b, name)
        if name == "kv_channels":
            name, va, vb = "head_dim", a.head_dim, b.head_dim
        if name == "num_query_groups":
            va, vb = a.num_query_groups, b.num_query_groups
        if isinstance(va, float) and isinstance(vb, float):
            # configs round-tripped through float32 (rms_norm_eps 1e-5 -> 9.9999997e-06) agree
            if math.isclose(va, vb, rel_tol=1e-6):
                continue
        if va != vb:
            out.append(f"{name}: {va} != {vb}")
    return out


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(32, 4096, 32, 32, 11008, 32000, seq_length=4096),
    "llama2-13b": ModelConfig(40, 5120, 40, 40, 13824, 32000, seq_length=4096),
    "llama2-70b": ModelConfig(80, 8192, 64, 8, 28672, 32000, seq_length=4096),
    "llama3-8b": ModelConfig(32, 4096, 32, 8, 14336, 128256, seq_length=8192, rotary_base=500000.0),
    "llama3-70b": ModelConfig(
        80, 8192, 64, 8, 28672, 128256, seq_length=8192, rotary_base=500000.0,
    ),
    "llama3.1-8b": ModelConfig(
        32, 4096, 32, 8, 14336, 128256, seq_length=8192, rotary_base=500000.0,
        rope_scaling="llama3", rope_scaling_factor=8.0,
    ),
    "llama3.2-1b": ModelConfig(
        16, 2048, 32, 8, 8192, 128256, kv_channels=64, seq_length=8192, rotary_base=500000.0,
        tie_word_embeddings=True, rope_scaling="llama3", rope_scaling_factor=32.0,
    ),
    "llama3.2-3b": ModelConfig(
        28, 3072, 24, 8, 8192, 128256, seq_length=8192, rotary_base=500000.0,
        tie_word_embeddings=True, rope_scaling="llama3", rope_scaling_factor=32.0,
    ),
    "smollm2-135m": ModelConfig(
        30, 576, 9, 3, 1536, 49152, seq_length=8192, rotary_base=100000.0,
        tie_word_embeddings=True,
    ),
    # Tiny shapes for tests and CPU runs.
    "tiny-mha": ModelConfig(4, 64, 4, 4, 160, 256, seq_length=64),
    "tiny-gqa": ModelConfig(4, 64, 4, 2, 160, 256, seq_length=64),
    "tiny-gqa-8h": ModelConfig(4, 64, 8, 4, 160, 256, seq_length=64),
    # tied embeddings and a vocabulary that needs padding (250 -> 256 rows)
    "tiny-gqa-tied": ModelConfig(4, 64, 8, 4, 160, 250, seq_length=64, tie_word_embeddings=True),
}  # fmt: skip


def get_preset(name: str) -> ModelConfig:
    """Return a copy of a named model shape."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
