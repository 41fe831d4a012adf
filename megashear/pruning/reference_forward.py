"""Pure-torch LLaMA forward on canonical weights, plain and under hard-concrete masks.

This is the executable definition of what the masks mean (docs/method.md §2), used to test
finalisation; it is not a training path. Weights are canonical (:mod:`megashear.layout`); a tied
model has no ``lm_head`` and uses the embedding as its LM head.

Masks (see :mod:`.hard_concrete`): a dict kind -> full tensor; absent kinds are all ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megashear.layout import lm_head
from megashear.model_config import ModelConfig
from megashear.rope import rotary_inv_freq


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, z_hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over ``[..., h]``; under a hidden mask the variance is the mean over KEPT dims
    only and the output is multiplied by ``weight * z_hidden``."""
    if z_hidden is None:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + eps) * weight
    keep = (z_hidden != 0).to(x.dtype)  # [h]
    variance = (x.pow(2) * keep).sum(-1, keepdim=True) / keep.sum().clamp(min=1)
    return x * torch.rsqrt(variance + eps) * (weight * z_hidden)


def rotary_cos_sin(
    seq_len: int, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style (non-interleaved) RoPE tables ``cos, sin``: ``[s, hn]`` each."""
    inv_freq = rotary_inv_freq(cfg)  # [hn/2]
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # [s, hn/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, hn]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _attention(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    prefix: str,
    cfg: ModelConfig,
    z_head: torch.Tensor | None,
) -> torch.Tensor:
    """Causal GQA self-attention ``[b, s, h] -> [b, s, h]``; ``z_head [a]`` scales each head."""
    b, s, _ = x.shape
    hn = cfg.head_dim
    q = (x @ w[prefix + "q"].T).view(b, s, -1, hn).transpose(1, 2)  # [b, a, s, hn]
    k = (x @ w[prefix + "k"].T).view(b, s, -1, hn).transpose(1, 2)  # [b, g, s, hn]
    v = (x @ w[prefix + "v"].T).view(b, s, -1, hn).transpose(1, 2)  # [b, g, s, hn]
    a, g = q.shape[1], k.shape[1]
    cos, sin = rotary_cos_sin(s, cfg, x.dtype)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(a // g, dim=1)  # [b, a, s, hn]
    v = v.repeat_interleave(a // g, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)  # [b, a, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(-1) @ v  # [b, a, s, hn]
    if z_head is not None:
        out = out * z_head[:, None, None]
    out = out.transpose(1, 2).reshape(b, s, a * hn)  # [b, s, a*hn]
    return out @ w[prefix + "o"].T


def masked_llama_forward(
    weights: dict[str, torch.Tensor],
    cfg: ModelConfig,
    masks: dict[str, torch.Tensor],
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Logits ``[b, s, v]`` of the masked model for ``tokens [b, s]`` (docs/method.md §2 table).

    - embeddings ``× z_hidden``;
    - every RMSNorm: variance over kept hidden dims, ``× weight × z_hidden``;
    - head ``j`` output ``× z_head[l, j]`` before ``o``; attention output
      ``× z_head_layer[l] × z_layer[l] × z_hidden``;
    - SwiGLU activations ``× z_intermediate[l]`` before ``down``; MLP output
      ``× z_mlp[l] × z_layer[l] × z_hidden``.
    """
    z = masks
    z_hidden = z.get("hidden")
    eps = cfg.norm_epsilon
    x = weights["embedding"][tokens]  # [b, s, h]
    if z_hidden is not None:
        x = x * z_hidden
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        z_layer = z["layer"][i] if "layer" in z else None
        y = rms_norm(x, weights[p + "input_norm"], eps, z_hidden)
        y = _attention(y, weights, p, cfg, z["head"][i] if "head" in z else None)
        for gate in (z["head_layer"][i] if "head_layer" in z else None, z_layer, z_hidden):
            if gate is not None:
                y = y * gate
        x = x + y
        y = rms_norm(x, weights[p + "post_attn_norm"], eps, z_hidden)
        act = F.silu(y @ weights[p + "gate"].T) * (y @ weights[p + "up"].T)  # [b, s, f]
        if "intermediate" in z:
            act = act * z["intermediate"][i]
        y = act @ weights[p + "down"].T
        for gate in (z["mlp"][i] if "mlp" in z else None, z_layer, z_hidden):
            if gate is not None:
                y = y * gate
        x = x + y
    x = rms_norm(x, weights["final_norm"], eps, z_hidden)
    return x @ lm_head(weights).T


def llama_forward(
    weights: dict[str, torch.Tensor], cfg: ModelConfig, tokens: torch.Tensor
) -> torch.Tensor:
    """Logits ``[b, s, v]`` of a plain LLaMA for ``tokens [b, s]``.

    Written independently of :func:`masked_llama_forward` (``F.rms_norm``, ``F.scaled_dot_product_
    attention``), so that tests comparing the two also cross-check the implementations.
    """
    hn, eps = cfg.head_dim, cfg.norm_epsilon
    b, s = tokens.shape
    x = F.embedding(tokens, weights["embedding"])  # [b, s, h]
    cos, sin = rotary_cos_sin(s, cfg, x.dtype)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        y = F.rms_norm(x, (x.shape[-1],), weights[p + "input_norm"], eps)
        q = F.linear(y, weights[p + "q"]).view(b, s, -1, hn).transpose(1, 2)  # [b, a, s, hn]
        k = F.linear(y, weights[p + "k"]).view(b, s, -1, hn).transpose(1, 2)  # [b, g, s, hn]
        v = F.linear(y, weights[p + "v"]).view(b, s, -1, hn).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        q = q * cos + _rotate_half(q) * sin
        k = (k * cos + _rotate_half(k) * sin).repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, a, s, hn]
        x = x + F.linear(attn.transpose(1, 2).reshape(b, s, -1), weights[p + "o"])
        y = F.rms_norm(x, (x.shape[-1],), weights[p + "post_attn_norm"], eps)
        act = F.silu(F.linear(y, weights[p + "gate"])) * F.linear(y, weights[p + "up"])
        x = x + F.linear(act, weights[p + "down"])
    x = F.rms_norm(x, (x.shape[-1],), weights["final_norm"], eps)
    return F.linear(x, lm_head(weights))
