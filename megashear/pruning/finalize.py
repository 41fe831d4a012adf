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

:func:`finalize` does it all in memory; :func:`plan_finalization` (from the masks alone),
:func:`finalize_layer_weight` and :func:`finalize_global` are its parts, which
:mod:`megashear.jobs.finalize` streams one source tensor at a time.

The reference forwards that define "equal" (``masked_llama_forward``, ``llama_forward``) live in
:mod:`.reference_forward`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from megashear.layout import LAYER_KEYS, canonical_order, canonical_shapes, layer_key, split_key
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
    log_alpha: dict[str, torch.Tensor],
    source: ModelConfig,
    target: ModelConfig,
    pinned_hidden: list[int] | tuple[int, ...] = (),
    floor: float = hc.LOG_ALPHA_MIN,
) -> dict[str, torch.Tensor]:
    """Deterministic masks at exactly the target sizes (GQA group-wise; layer kinds jointly;
    the pinned hidden channels kept at 1; ``floor``: the clamp's floor of the run's init)."""
    return hc.deterministic_masks(
        log_alpha,
        target_sizes(target, log_alpha.keys()),
        num_query_groups=source.num_query_groups,
        target_query_groups=target.num_query_groups,
        pinned_hidden=pinned_hidden,
        floor=floor,
    )


def _kept(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0).flatten()  # sorted ascending


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one source layer keeps: query heads ``[a']``, key/value groups ``[g']``, FFN units
    ``[f']`` (source indices, ascending) and the scalar gates folded into ``o`` and ``down``."""

    heads: torch.Tensor
    groups: torch.Tensor
    ffn: torch.Tensor
    attn_gate: float
    mlp_gate: float
    alive: bool


@dataclasses.dataclass(frozen=True)
class FinalizationPlan:
    """Everything finalisation needs besides the weights, decided from the masks alone.

    ``layers[j]`` is the source layer that becomes layer ``j`` of ``config``; ``hidden`` are the
    kept hidden dims ``[h']`` and ``z_hidden`` their soft values (None: no hidden mask).
    """

    source: ModelConfig
    config: ModelConfig
    masks: dict[str, torch.Tensor]
    hidden: torch.Tensor
    z_hidden: torch.Tensor | None
    layers: tuple[int, ...]
    layer_plans: tuple[LayerPlan, ...]


def _layer_plan(source: ModelConfig, masks: dict[str, torch.Tensor], i: int) -> LayerPlan:
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
    return LayerPlan(
        heads=heads,
        groups=groups,
        ffn=ffn,
        attn_gate=attn_gate,
        mlp_gate=mlp_gate,
        alive=z_layer != 0 and (attn_gate != 0 or mlp_gate != 0),
    )


def plan_finalization(
    source: ModelConfig, masks: dict[str, torch.Tensor], target: ModelConfig | None = None
) -> FinalizationPlan:
    """Decide the kept layers, heads, groups, FFN units and hidden dims from ``masks``.

    Args:
        source: the source shape.
        masks: kind -> full deterministic mask (e.g. :func:`finalization_masks`), real tensors.
        target: when given, the result's shape must equal it.

    Raises:
        ValueError: every layer pruned, kept layers of different shapes, or not ``target``.
    """
    masks = {k: v.detach().cpu() for k, v in masks.items()}
    if "hidden" in masks:
        hidden = _kept(masks["hidden"])
        z_h = masks["hidden"][hidden]  # [h']
    else:
        hidden, z_h = torch.arange(source.hidden_size), None
    plans = tuple(_layer_plan(source, masks, i) for i in range(source.num_layers))
    kept_layers = tuple(i for i, p in enumerate(plans) if p.alive)
    if not kept_layers:
        raise ValueError("every layer is pruned")
    shape_of = {
        (p.heads.numel(), p.groups.numel(), p.ffn.numel()) for p in (plans[i] for i in kept_layers)
    }
    if len(shape_of) != 1:
        raise ValueError(f"kept layers differ in (heads, groups, FFN): {sorted(shape_of)}")
    n_heads, n_groups, n_ffn = shape_of.pop()
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
    return FinalizationPlan(source, cfg, masks, hidden, z_h, kept_layers, plans)


def _rows(index: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of blocks ``index`` of ``width`` rows each."""
    return (index[:, None] * width + torch.arange(width)).flatten()


_VIEW_AS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> numpy-able dtype


def _take(w: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``index_select``; the columns of a CPU matrix by ``numpy.take`` on its bits, which is
    4-5x faster than ``index_select`` along dim 1 (bf16 and fp32 alike) and bit-exact."""
    if dim != 1 or w.dim() != 2 or w.device.type != "cpu" or w.requires_grad:
        return torch.index_select(w, dim, index.to(w.device))
    import numpy as np

    bits = w.contiguous().view(_VIEW_AS[w.element_size()]).numpy()
    return torch.from_numpy(np.take(bits, index.numpy(), axis=1)).view(w.dtype)


SCALE_BLOCK = 1 << 22  # elements of low-precision weights scaled at a time (16 MB of fp32)


def _scale(
    w: torch.Tensor,
    s: torch.Tensor | float | None,
    dim: int = 0,
    then: torch.Tensor | None = None,
    then_dim: int = 0,
) -> torch.Tensor:
    """``w`` times ``s`` along ``dim`` (then times ``then`` along ``then_dim``), computed in fp32
    or better, so that low-precision weights are rounded once, at the end. Rows are scaled
    :data:`SCALE_BLOCK` elements at a time, so the fp32 copy of a bf16 embedding never exists
    whole; every element gets the same two multiplications either way."""
    if s is None and then is None:
        return w
    compute = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32

    def view(v: torch.Tensor | float | None, d: int) -> torch.Tensor | float | None:
        if v is None or isinstance(v, float):
            return v
        shape = [1] * w.dim()
        shape[d] = -1
        return v.to(device=w.device, dtype=compute).view(shape)

    factors = [f for f in (view(s, dim), view(then, then_dim)) if f is not None]
    out = torch.empty_like(w)
    step = max(1, SCALE_BLOCK // max(1, w[0].numel())) if w.dim() > 1 else w.shape[0]
    for a in range(0, w.shape[0], step):
        block = w[a : a + step].to(compute, copy=True)  # [rows, ...]
        for f in factors:
            per_row = isinstance(f, torch.Tensor) and f.shape[0] != 1
            block.mul_(f[a : a + step] if per_row else f)
        out[a : a + step] = block
    return out


def finalize_layer_weight(
    plan: FinalizationPlan, new: int, key: str, get: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """One weight of layer ``new`` of the finalised model.

    Args:
        plan: from :func:`plan_finalization`.
        new: the finalised layer's index; its source layer is ``plan.layers[new]``.
        key: a per-layer canonical key (``"q"``, ``"down"``, ...; :data:`LAYER_KEYS`).
        get: per-layer canonical key -> that source layer's tensor; called for ``key`` only.

    Returns:
        The tensor of :func:`megashear.layout.layer_shapes` of ``plan.config`` under ``key``.
    """
    i = plan.layers[new]
    p, masks, hidden, z_h = plan.layer_plans[i], plan.masks, plan.hidden, plan.z_hidden
    hn = plan.source.head_dim
    if key in ("input_norm", "post_attn_norm"):
        return _scale(_take(get(key), 0, hidden), z_h)
    if key in ("q", "k", "v"):
        rows = _rows(p.heads if key == "q" else p.groups, hn)
        return _take(_take(get(key), 0, rows), 1, hidden)
    if key == "o":
        q_rows = _rows(p.heads, hn)
        col = torch.full((q_rows.numel(),), p.attn_gate, dtype=torch.float64)
        if "head" in masks:
            col = col * masks["head"][i][p.heads].double().repeat_interleave(hn)  # [a'*hn]
        return _scale(_take(_take(get("o"), 0, hidden), 1, q_rows), col, 1, then=z_h)
    if key in ("gate", "up"):
        w = _take(_take(get(key), 0, p.ffn), 1, hidden)
        if key == "gate" or "intermediate" not in masks:
            return w
        return _scale(w, masks["intermediate"][i][p.ffn])
    if key == "down":
        down = _take(_take(get("down"), 0, hidden), 1, p.ffn)
        return _scale(down, None if p.mlp_gate == 1.0 else p.mlp_gate, then=z_h)
    raise KeyError(f"{key} is not a per-layer weight")


def finalize_layer(
    plan: FinalizationPlan, new: int, get: Callable[[str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every weight of layer ``new`` of the finalised model (:func:`finalize_layer_weight`)."""
    return {k: finalize_layer_weight(plan, new, k, get) for k in LAYER_KEYS}


def finalize_global(
    plan: FinalizationPlan, key: str, get: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """One non-layer weight (``embedding``, ``final_norm`` or ``lm_head``) of the finalised
    model, from ``get`` (canonical key -> source tensor)."""
    hidden, z_h = plan.hidden, plan.z_hidden
    if key == "embedding":
        return _scale(_take(get("embedding"), 1, hidden), z_h, 1)
    if key == "final_norm":
        w = _take(get("final_norm"), 0, hidden)
        # tied: the shared matrix already carries z_H (see the module docstring)
        return w if plan.source.tie_word_embeddings else _scale(w, z_h)
    if key == "lm_head" and not plan.source.tie_word_embeddings:
        return _take(get("lm_head"), 1, hidden)
    raise KeyError(f"{key} is not a non-layer weight of the finalised model")


def finalize(
    weights: dict[str, torch.Tensor],
    source: ModelConfig,
    masks: dict[str, torch.Tensor],
    target: ModelConfig | None = None,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Prune canonical weights of ``source`` with deterministic ``masks``, all in memory.

    Args:
        weights: canonical full weights of ``source`` (any device, including meta).
        source: the source shape.
        masks: kind -> full deterministic mask (e.g. :func:`finalization_masks`), real tensors.
        target: when given, the result's shape must equal it.

    Returns:
        (canonical weights of the pruned model in :func:`megashear.layout.canonical_order`,
        its ModelConfig).
    """
    expected = set(canonical_shapes(source))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"canonical weights mismatch: missing {missing[:4]}, unexpected {extra[:4]}"
        )
    plan = plan_finalization(source, masks, target)
    out = {}
    for key in canonical_order(plan.config):
        i, k = split_key(key)
        if i is None:
            out[key] = finalize_global(plan, key, weights.__getitem__)
        elif k == LAYER_KEYS[0]:
            src = plan.layers[i]
            layer = finalize_layer(plan, i, lambda k, src=src: weights[layer_key(src, k)])
            out.update({layer_key(i, k2): t for k2, t in layer.items()})
    return out, plan.config
