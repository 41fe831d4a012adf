"""Canonical weights <-> full megatron-core ``GPTModel`` state dicts (local spec, TP1, unsharded).

The canonical form is :mod:`megashear.layout` (HF layout without prefixes, HF rotary order,
vocabulary unpadded, no ``lm_head`` when tied).

megatron-core (``get_gpt_layer_local_spec``; layouts read from megatron-core 0.16.1)::

    embedding.word_embeddings.weight [v_pad, h]  output_layer.weight [v_pad, h] (absent if tied)
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

``v_pad`` is :attr:`ModelConfig.padded_vocab_size`: the padded rows are zeros on the way in and
dropped on the way out. With tied embeddings megatron-core's state dict has no output layer
weight (the last pipeline stage's copy is saved under the embedding's key, as a replica).

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


def _qkv_blocks(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Views ``q [g, r*hn, h]``, ``k [g, hn, h]``, ``v [g, hn, h]`` of the packed tensor."""
    g, hn = cfg.num_query_groups, cfg.head_dim
    r = cfg.num_attention_heads // g
    blocks = qkv.reshape(g, (r + 2) * hn, qkv.shape[1])
    return torch.split(blocks, [r * hn, hn, hn], dim=1)


def unpack_qkv(
    qkv: torch.Tensor, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_qkv`."""
    h = qkv.shape[1]
    q, k, v = _qkv_blocks(qkv, cfg)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


VOCAB_KEYS = ("embedding", "lm_head")


def global_keys(cfg: ModelConfig) -> dict[str, str]:
    """Canonical -> megatron name of the non-layer weights of ``cfg`` (no output layer if tied)."""
    return {
        ck: mk
        for ck, mk in GLOBAL_KEYS.items()
        if not (ck == "lm_head" and cfg.tie_word_embeddings)
    }


def pad_vocab(t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """``[v, h]`` -> ``[v_pad, h]`` with zero rows appended."""
    extra = cfg.padded_vocab_size - t.shape[0]
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


def megatron_tensor(
    name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig
) -> torch.Tensor:
    """One full megatron-core tensor, built from the canonical tensors ``get`` returns."""
    for ck, mk in global_keys(cfg).items():
        if name == mk:
            return pad_vocab(get(ck), cfg) if ck in VOCAB_KEYS else get(ck)
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
    globals_ = global_keys(cfg)
    if key in globals_:
        t = get(globals_[key])
        return t[: cfg.vocab_size] if key in VOCAB_KEYS else t
    _, i, ck = key.split(".", 2)
    if ck in LAYER_KEYS:
        return get(LAYER_KEYS[ck].format(i))
    if ck in ("q", "k", "v"):
        qkv = get(QKV.format(i))
        return _qkv_blocks(qkv, cfg)["qkv".index(ck)].reshape(-1, qkv.shape[1])  # one copy
    if ck in ("gate", "up"):
        return torch.chunk(get(FC1.format(i)), 2, dim=0)[("gate", "up").index(ck)]
    raise KeyError(f"{key} is not a canonical LLaMA weight")


def canonical_to_megatron(
    weights: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Canonical weights -> full megatron-core state dict (strict: every key used once)."""
    globals_ = global_keys(cfg)
    used = len(globals_) + cfg.num_layers * (len(LAYER_KEYS) + 5)
    if len(weights) != used:
        raise ValueError(f"canonical weights have {len(weights)} tensors, expected {used}")
    names = list(globals_.values()) + [
        mk.format(i) for i in range(cfg.num_layers) for mk in (*LAYER_KEYS.values(), QKV, FC1)
    ]
    return {n: megatron_tensor(n, weights.__getitem__, cfg) for n in names}


def megatron_to_canonical(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Full megatron-core state dict -> canonical weights (strict: every key used once)."""
    globals_ = global_keys(cfg)
    used = len(globals_) + cfg.num_layers * (len(LAYER_KEYS) + 2)
    if len(state) != used:
        raise ValueError(f"megatron state dict has {len(state)} tensors, expected {used}")
    keys = list(globals_) + [
        f"layers.{i}.{ck}"
        for i in range(cfg.num_layers)
        for ck in (*LAYER_KEYS, "q", "k", "v", "gate", "up")
    ]
    return {k: canonical_tensor(k, state.__getitem__, cfg) for k in keys}
