"""The canonical weight layout: one home for the keys, their order, shapes and initialisation.

Every format (Hugging Face, Meta, megatron-core) reads into this form and writes out of it; the
finalisation and the reference forward work on it. Canonical weights are full (unsharded)
tensors under per-layer names, in HF's layout without prefixes and HF's (non-interleaved)
rotary order, with the vocabulary unpadded:

==============================  ============  =================================================
key                             shape         notes
==============================  ============  =================================================
``embedding``                   ``[v, h]``
``layers.{i}.input_norm``       ``[h]``
``layers.{i}.q``                ``[a*hn, h]`` rows ``j*hn:(j+1)*hn`` are query head ``j``
``layers.{i}.k``, ``.v``        ``[g*hn, h]`` query head ``j`` uses group ``j // (a/g)``
``layers.{i}.o``                ``[h, a*hn]``
``layers.{i}.post_attn_norm``   ``[h]``
``layers.{i}.gate``, ``.up``    ``[f, h]``
``layers.{i}.down``             ``[h, f]``
``final_norm``                  ``[h]``
``lm_head``                     ``[v, h]``    absent when ``tie_word_embeddings``
==============================  ============  =================================================
"""

from __future__ import annotations

import torch

from megashear.model_config import ModelConfig

LAYER_KEYS = ("input_norm", "q", "k", "v", "o", "post_attn_norm", "gate", "up", "down")


def layer_key(i: int, key: str) -> str:
    return f"layers.{i}.{key}"


def split_key(canonical: str) -> tuple[int | None, str]:
    """``layers.3.q`` -> ``(3, "q")``; ``embedding`` -> ``(None, "embedding")``."""
    if canonical.startswith("layers."):
        _, i, key = canonical.split(".", 2)
        return int(i), key
    return None, canonical


def canonical_order(cfg: ModelConfig) -> list[str]:
    """Canonical keys layer by layer: the order files are written and streamed in."""
    layers = [layer_key(i, k) for i in range(cfg.num_layers) for k in LAYER_KEYS]
    tail = ["final_norm"] if cfg.tie_word_embeddings else ["final_norm", "lm_head"]
    return ["embedding", *layers, *tail]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer key -> shape (the same for every layer)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    a, g, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    return {
        "input_norm": (h,),
        "q": (a * hn, h),
        "k": (g * hn, h),
        "v": (g * hn, h),
        "o": (h, a * hn),
        "post_attn_norm": (h,),
        "gate": (f, h),
        "up": (f, h),
        "down": (h, f),
    }


def canonical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for every weight of ``cfg``, in :func:`canonical_order`."""
    per_layer = layer_shapes(cfg)
    v, h = cfg.vocab_size, cfg.hidden_size
    shapes = {}
    for key in canonical_order(cfg):
        i, k = split_key(key)
        shapes[key] = per_layer[k] if i is not None else ((h,) if k == "final_norm" else (v, h))
    return shapes


def lm_head(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head ``[v, h]``: its own tensor, or the embedding when tied."""
    return weights["lm_head"] if "lm_head" in weights else weights["embedding"]


def init_canonical_weights(
    cfg: ModelConfig,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    std: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Random canonical weights (norm weights near 1); ``device="meta"`` allocates nothing."""
    out = {}
    for key, shape in canonical_shapes(cfg).items():
        if str(device) == "meta":
            out[key] = torch.empty(shape, dtype=dtype, device="meta")
            continue
        w = torch.randn(shape, generator=generator, dtype=dtype) * std
        out[key] = (w + 1.0 if key.endswith("norm") else w).to(device)
    return out
