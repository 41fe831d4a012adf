"""One-shot structured pruning without learned masks: keep the leading units.

The baseline of the Sheared-LLaMA comparison that prunes to the same target shape *without*
learning where to cut: every layer keeps its first ``g'`` key/value groups and, in each of them,
its first ``r' = a'/g'`` query heads; the model keeps its first ``h'`` hidden channels, every
kept layer its first ``f'`` FFN units, and the first ``L'`` layers are kept.

:func:`leading_masks` returns those choices as 0/1 mask dicts in the layout of
:mod:`megashear.pruning.hard_concrete` (``hidden [h]``, ``head [L, a]``, ``intermediate [L, f]``,
``layer [L]``), which :func:`megashear.pruning.finalize.finalize` accepts; every survivor's value
is exactly 1, so no weight is rescaled and the cut model is the source's leading sub-network
(with tied embeddings it stays tied). :func:`one_shot_prune` applies them to canonical weights.
"""

from __future__ import annotations

import torch

from megashear.model_config import ModelConfig
from megashear.pruning.targets import validate_target


def leading_masks(source: ModelConfig, target: ModelConfig) -> dict[str, torch.Tensor]:
    """0/1 masks (float32) keeping the first heads of the first groups, the first hidden
    channels, the first FFN units and the first layers of ``source`` at ``target``'s sizes.

    Raises:
        ValueError: ``target`` cannot be cut from ``source`` (see ``validate_target``).
    """
    validate_target(source, target)
    L, h, f = source.num_layers, source.hidden_size, source.ffn_hidden_size
    a, g = source.num_attention_heads, source.num_query_groups
    r = a // g
    a2, g2 = target.num_attention_heads, target.num_query_groups
    r2 = a2 // g2

    def first(n: int, keep: int) -> torch.Tensor:
        z = torch.zeros(n, dtype=torch.float32)
        z[:keep] = 1.0
        return z

    # query head j belongs to group j // r and is the (j % r)-th head of it
    j = torch.arange(a)
    head_row = ((j // r < g2) & (j % r < r2)).to(torch.float32)
    return {
        "hidden": first(h, target.hidden_size),
        "head": head_row.expand(L, a).clone(),
        "intermediate": first(f, target.ffn_hidden_size).expand(L, f).clone(),
        "layer": first(L, target.num_layers),
    }


def one_shot_prune(
    weights, source: ModelConfig, target: ModelConfig
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Canonical weights of ``source`` (a dict, or any mapping that loads on access) cut to
    ``target`` by :func:`leading_masks`; returns ``(weights, config)`` like ``finalize``."""
    from megashear.pruning.finalize import finalize

    return finalize(weights, source, leading_masks(source, target), target)
