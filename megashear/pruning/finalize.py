"""Finalisation: deterministic masks -> a dense LLaMA of the target shape (docs/method.md §4).

Works on canonical full (unsharded) weights (layout in :mod:`megashear.layout`) and on mask
dicts of full tensors (layout in :mod:`.hard_concrete`; soft values on survivors, 0 on pruned
entries, absent kinds all ones). Weights may live on ``torch.device("meta")``: only the masks
need values, so a 7B plan can be checked without allocating it.

Folding the survivors' soft values (so that the pruned model equals the masked model):

- ``hidden`` (kept dims ``H``, values ``z_H``): ``embedding[:, H] · z_H``; every norm weight
  ``[H] · z_H``; the output rows of ``o`` and ``down`` ``· z_H``. The LM head is only sliced: its
  input is the final norm's output, already scaled through the final norm weight (the reference
  code scales the LM head a second time, which its own comment calls a bug; not reproduced).
  With tied embeddings the one matrix is both: it carries ``z_H`` (for the embedding), so the
  final norm weight is only sliced, and the logits ``(norm·w)·(E·z_H)ᵀ = (norm·w·z_H)·Eᵀ`` are the
  masked model's. The finalised model stays tied.
- ``head``: the input columns of ``o`` for that head. The reference code (docs/method.md §4)
  folds it into the value rows, which is identical for MHA; with GQA a value head is shared by
  the group's query heads, so the per-query-head scale can only go to ``o``'s columns.
- ``head_layer`` and ``layer``: all of ``o``. ``mlp`` and ``layer``: all of ``down``.
- ``intermediate``: the rows of ``up``.

Then every matrix is sliced, layers whose ``layer`` gate is 0 (or whose ``head_layer`` and
``mlp`` gates are both 0) are dropped, and the rest renumbered 0..L'-1. The RMSNorm of the
finalised model takes its variance over its ``h'`` dims, which are exactly the masked model's
kept dims, so the two agree. Every kept layer must keep the same number of heads, groups
(each with the same number of heads) and FFN units; otherwise a ``ValueError`` is raised.

The reference forwards that define "equal" (``masked_llama_forward``, ``llama_forward``) live in
:mod:`.reference_forward`.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from megashear.layout import canonical_shapes
from megashear.model_config import ModelConfig
from megashear.pruning import hard_concrete as hc
from megashear.pruning.targets import target_sizes, validate_target

logger = logging.getLogger(__name__)


def finalized_config(
    source: ModelConfig, layers: int, hidden: int, heads: int, groups: int, ffn: int
) -> ModelConfig:
    """The source's config at the pruned sizes: the head dim, vocabulary, tie, RoPE and norm
    settings are inherited."""
    hn = source.head_dim
    return dataclasses.replace(
        source,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=ffn,
        kv_channels=None if hidden == heads * hn else hn,
    )


def finalization_plan(source: ModelConfig, target: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the finalised canonical weights, computed without tensors.

    The head dim is the source's; counts come from ``target`` (validated against ``source``).
    """
    validate_target(source, target)
    t = target
    cfg = finalized_config(
        source, t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups,
        t.ffn_hidden_size,
    )  # fmt: skip
    return canonical_shapes(cfg)


def finalization_masks(
    log_alpha: dict[str, torch.Tensor], source: ModelConfig, target: ModelConfig
) -> dict[str, torch.Tensor]:
    """Deterministic masks at exactly the target sizes (GQA group-wise; layer kinds jointly)."""
    return hc.deterministic_masks(
        log_alpha,
        target_sizes(target, log_alpha.keys()),
        num_query_groups=source.num_query_groups,
        target_query_groups=target.num_query_groups,
    )


def _kept(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0).flatten()  # sorted ascending


def _layer_plan(source: ModelConfig, masks: dict[str, torch.Tensor], i: int) -> dict:
    """Kept heads/groups/FFN units of layer ``i`` and its scalar gates."""
    a, g = source.num_attention_heads, source.num_query_groups
    r = a // g
    heads = _kept(masks["head"][i]) if "head" in masks else torch.arange(a)
    groups, counts = torch.unique_consecutive(heads // r, return_counts=True)
    if heads.numel() == 0 or counts.min() != counts.max():
        raise ValueError(
            f"layer {i}: kept heads {heads.tolist()} are not the same number in every kept group"
        )
    ffn = (
        _kept(masks["intermediate"][i])
        if "intermediate" in masks
        else torch.arange(source.ffn_hidden_size)
    )
    z_layer = float(masks["layer"][i]) if "layer" in masks else 1.0
    attn_gate = z_layer * (float(masks["head_layer"][i]) if "head_layer" in masks else 1.0)
    mlp_gate = z_layer * (float(masks["mlp"][i]) if "mlp" in masks else 1.0)
    return dict(
        heads=heads,
        groups=groups,
        per_group=int(counts[0]),
        ffn=ffn,
        attn_gate=attn_gate,
        mlp_gate=mlp_gate,
        alive=z_layer != 0 and (attn_gate != 0 or mlp_gate != 0),
    )


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of blocks ``index`` of ``width`` rows each."""
    return (index[:, None] * width + torch.arange(width)).flatten()


def finalize(
    weights: dict[str, torch.Tensor],
    source: ModelConfig,
    masks: dict[str, torch.Tensor],
    target: ModelConfig | None = None,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Prune canonical weights of ``source`` with deterministic ``masks``.

    Args:
        weights: canonical full weights of ``source`` (any device, including meta).
        source: the source shape.
        masks: kind -> full deterministic mask (e.g. :func:`finalization_masks`), real tensors.
        target: when given, the result's shape must equal it.

    Returns:
        (canonical weights of the pruned model, its ModelConfig).
    """
    expected = set(canonical_shapes(source))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"canonical weights mismatch: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    masks = {k: v.detach().cpu() for k, v in masks.items()}
    hn = source.head_dim
    if "hidden" in masks:
        hidden = _kept(masks["hidden"])
        z_h = masks["hidden"][hidden]  # [h']
    else:
        hidden, z_h = torch.arange(source.hidden_size), None

    def take(w: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
        return torch.index_select(w, dim, index.to(w.device))

    def scale(w: torch.Tensor, s: torch.Tensor | None, dim: int) -> torch.Tensor:
        if s is None:
            return w
        shape = [1] * w.dim()
        shape[dim] = -1
        return w * s.to(device=w.device, dtype=w.dtype).view(shape)

    def norm(w: torch.Tensor) -> torch.Tensor:
        return scale(take(w, 0, hidden), z_h, 0)

    plans = [_layer_plan(source, masks, i) for i in range(source.num_layers)]
    kept_layers = [i for i, p in enumerate(plans) if p["alive"]]
    if not kept_layers:
        raise ValueError("every layer is pruned")
    shape_of = {
        (p["heads"].numel(), p["groups"].numel(), p["ffn"].numel())
        for p in (plans[i] for i in kept_layers)
    }
    if len(shape_of) != 1:
        raise ValueError(f"kept layers differ in (heads, groups, FFN): {sorted(shape_of)}")
    n_heads, n_groups, n_ffn = shape_of.pop()

    out = {"embedding": scale(take(weights["embedding"], 1, hidden), z_h, 1)}
    for new, i in enumerate(kept_layers):
        p, src, dst = plans[i], f"layers.{i}.", f"layers.{new}."
        q_rows, kv_rows = _rows(p["heads"], hn), _rows(p["groups"], hn)
        out[dst + "input_norm"] = norm(weights[src + "input_norm"])
        out[dst + "q"] = take(take(weights[src + "q"], 0, q_rows), 1, hidden)
        out[dst + "k"] = take(take(weights[src + "k"], 0, kv_rows), 1, hidden)
        out[dst + "v"] = take(take(weights[src + "v"], 0, kv_rows), 1, hidden)
        col = torch.full((q_rows.numel(),), p["attn_gate"], dtype=torch.float64)
        if "head" in masks:
            col = col * masks["head"][i][p["heads"]].double().repeat_interleave(hn)  # [a'*hn]
        o = take(take(weights[src + "o"], 0, hidden), 1, q_rows)
        out[dst + "o"] = scale(scale(o, col, 1), z_h, 0)
        out[dst + "post_attn_norm"] = norm(weights[src + "post_attn_norm"])
        ffn = p["ffn"]
        out[dst + "gate"] = take(take(weights[src + "gate"], 0, ffn), 1, hidden)
        up = take(take(weights[src + "up"], 0, ffn), 1, hidden)
        z_int = masks["intermediate"][i][ffn] if "intermediate" in masks else None
        out[dst + "up"] = scale(up, z_int, 0)
        down = take(take(weights[src + "down"], 0, hidden), 1, ffn)
        gate = p["mlp_gate"]
        out[dst + "down"] = scale(down if gate == 1.0 else down * gate, z_h, 0)
    if source.tie_word_embeddings:
        # the shared matrix already carries z_H (see the module docstring)
        out["final_norm"] = take(weights["final_norm"], 0, hidden)
    else:
        out["final_norm"] = norm(weights["final_norm"])
        out["lm_head"] = take(weights["lm_head"], 1, hidden)

    h = hidden.numel()
    cfg = finalized_config(source, len(kept_layers), h, n_heads, n_groups, n_ffn)
    if target is not None:
        fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups")
        for field in (*fields, "ffn_hidden_size", "head_dim"):
            if getattr(cfg, field) != getattr(target, field):
                raise ValueError(
                    f"finalised {field} {getattr(cfg, field)} != target {getattr(target, field)}"
                )
    logger.info(
        "finalised %d -> %d layers, hidden %d -> %d, heads %d/%d -> %d/%d, FFN %d -> %d",
        source.num_layers, cfg.num_layers, source.hidden_size, h, source.num_attention_heads,
        source.num_query_groups, n_heads, n_groups, source.ffn_hidden_size, n_ffn,
    )  # fmt: skip
    return out, cfg
