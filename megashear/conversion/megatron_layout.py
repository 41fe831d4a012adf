"""Canonical weights <-> full megatron-core ``GPTModel`` state dicts (local spec, TP1, unsharded).

Canonical form (HF layout without prefixes, HF rotary order)::

    embedding [v, h]            final_norm [h]            lm_head [v, h]
    layers.{i}.input_norm [h]   layers.{i}.post_attn_norm [h]
    layers.{i}.q [a*hn, h]  .k [g*hn, h]  .v [g*hn, h]  .o [h, a*hn]
    layers.{i}.gate [f, h]  .up [f, h]  .down [h, f]

megatron-core (``get_gpt_layer_local_spec``; layouts read from megatron-core 0.16.1)::

    embedding.word_embeddings.weight [v, h]      output_layer.weight [v, h]
    decoder.final_layernorm.weight [h]
    decoder.layers.{i}.input_layernorm.weight [h]
    decoder.layers.{i}.self_attention.linear_qkv.weight [(a + 2g)*hn, h]
        rows grouped by key/value group: for each group its a/g query heads, then its key head,
        then its value head (``SelfAttention.get_query_key_value_tensors`` splits the per-group
        block ``[(a/g + 2)*hn]`` into q, k, v in that order)
    decoder.layers.{i}.self_attention.linear_proj.weight [h, a*hn]
    decoder.layers.{i}.pre_mlp_layernorm.weight [h]
    decoder.layers.{i}.mlp.linear_fc1.weight [2f, h] = [gate; up] (``MLP.forward`` chunks the
        fc1 output in two and applies ``silu(first) * second``)
    decoder.layers.{i}.mlp.linear_fc2.weight [h, f]

Rotary embeddings: megatron-core's default (``rotary_interleaved=False``) is HF's half-split
order, so q and k rows are copied as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megashear.model_config import ModelConfig

LAYER_KEYS = {
    "input_norm": "decoder.layers.{}.input_layernorm.weight",
    "o": "decoder.layers.{}.self_attention.linear_proj.weight",
    "post_attn_norm": "decoder.layers.{}.pre_mlp_layernorm.weight",
    "down": "decoder.layers.{}.mlp.linear_fc2.weight",
}
GLOBAL_KEYS = {
    "embedding": "embedding.word_embeddings.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "lm_head": "output_layer.weight",
}
QKV = "decoder.layers.{}.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.{}.mlp.linear_fc1.weight"


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``q [a*hn, h]``, ``k, v [g*hn, h]`` -> megatron's group-interleaved ``[(a+2g)*hn, h]``."""
    g, hn = cfg.num_query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    h = q.shape[1]
    q = q.reshape(g, r * hn, h)
    k = k.reshape(g, hn, h)
    v = v.reshape(g, hn, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def unpack_qkv(
    qkv: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    g, hn = cfg.num_query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    h = qkv.shape[1]
    blocks = qkv.reshape(g, (r + 2) * hn, h)
    q, k, v = torch.split(blocks, [r * hn, hn, hn], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def megatron_tensor(
    name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig
) -> torch.Tensor:
    """One full megatron-core tensor, built from the canonical tensors ``get`` returns."""
    for ck, mk in GLOBAL_KEYS.items():
        if name == mk:
            return get(ck)
    i = int(name.split(".")[2])
    p = f"layers.{i}."
    if name == QKV.format(i):
        return pack_qkv(get(p + "q"), get(p + "k"), get(p + "v"), cfg)
    if name == FC1.format(i):
        return torch.cat([get(p + "gate"), get(p + "up")], dim=0)
    for ck, mk in LAYER_KEYS.items():
        if name == mk.format(i):
            return get(p + ck)
    raise KeyError(f"{name} is not a megatron-core LLaMA weight")


def canonical_tensor(
    key: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig
) -> torch.Tensor:
    """One canonical tensor, cut from the full megatron-core tensors ``get`` returns."""
    if key in GLOBAL_KEYS:
        return get(GLOBAL_KEYS[key])
    _, i, ck = key.split(".", 2)
    if ck in LAYER_KEYS:
        return get(LAYER_KEYS[ck].format(i))
    if ck in ("q", "k", "v"):
        return unpack_qkv(get(QKV.format(i)), cfg)["qkv".index(ck)]
    if ck in ("gate", "up"):
        return torch.chunk(get(FC1.format(i)), 2, dim=0)[("gate", "up").index(ck)]
    raise KeyError(f"{key} is not a canonical LLaMA weight")


def canonical_to_megatron(
    weights: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Canonical weights -> full megatron-core state dict (strict: every key used once)."""
    used = len(GLOBAL_KEYS) + cfg.num_layers * (len(LAYER_KEYS) + 5)
    if len(weights) != used:
        raise ValueError(f"canonical weights have {len(weights)} tensors, expected {used}")
    names = list(GLOBAL_KEYS.values()) + [
        mk.format(i) for i in range(cfg.num_layers) for mk in (*LAYER_KEYS.values(), QKV, FC1)
    ]
    return {n: megatron_tensor(n, weights.__getitem__, cfg) for n in names}


def megatron_to_canonical(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Full megatron-core state dict -> canonical weights (strict: every key used once)."""
    used = len(GLOBAL_KEYS) + cfg.num_layers * (len(LAYER_KEYS) + 2)
    if len(state) != used:
        raise ValueError(f"megatron state dict has {len(state)} tensors, expected {used}")
    keys = list(GLOBAL_KEYS) + [
        f"layers.{i}.{ck}"
        for i in range(cfg.num_layers)
        for ck in (*LAYER_KEYS, "q", "k", "v", "gate", "up")
    ]
    return {k: canonical_tensor(k, state.__getitem__, cfg) for k in keys}
