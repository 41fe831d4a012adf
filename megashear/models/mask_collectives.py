"""The collectives a :class:`~megashear.models.masked.MaskBank` needs to see whole masks.

A bank holds one pipeline stage's layers and one TP rank's share of the head and intermediate
masks. Local layouts: ``hidden [h]`` (replicated), ``head [Ll, a/tp]``, ``intermediate
[Ll, f/tp]``, the per-layer gates ``head_layer / mlp / layer [Ll]``. Full layouts: ``[h]``,
``[L, a]``, ``[L, f]``, ``[L]``. Both functions are collectives over the bank's TP and PP groups
(megatron-core's ``parallel_state``); every rank must call them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megashear.models.masked import MaskBank
from megashear.pruning import hard_concrete as hc


def gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``[Ll, ...]`` tensors of every rank of ``group`` along dim 0 (detached)."""
    world = dist.get_world_size(group)
    if world == 1:
        return local.detach()
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def expected_sparsity(bank: MaskBank) -> dict[str, torch.Tensor]:
    """Global expected sparsity per kind; gradients reach only this rank's own log α.

    ``head`` and ``intermediate`` give per-layer vectors ``[L]``: the TP partial sums are
    all-reduced (value of all ranks, gradient of the own share) and the rows all-gathered over
    PP (this stage's rows stay live). The others are scalars. ``hidden`` is replicated on every
    stage; only stage 0's copy carries the gradient, so that it is counted once.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    out = {}
    for kind in bank.kinds:
        keep = hc.keep_probability(bank.log_alpha(kind), bank.log_alpha_min)
        if kind == "hidden":
            kept = keep.sum() if pp_rank == 0 else keep.sum().detach()
            out[kind] = 1 - kept / bank.full[kind]
            continue
        if kind in ("head", "intermediate"):
            kept = keep.sum(dim=1)  # [Ll], this rank's share of each layer
            total = kept.detach().clone()
            dist.all_reduce(total, group=tp_group)
            kept = kept + (total - kept.detach())  # value: all TP ranks; grad: own share
        else:
            kept = keep  # [Ll]
        rows = gather_rows(kept, pp_group)  # [L], detached
        n = kept.shape[0]
        full = torch.cat([rows[: pp_rank * n], kept, rows[(pp_rank + 1) * n :]])  # live own rows
        if kind in ("head", "intermediate"):
            out[kind] = 1 - full / bank.full[kind]
        else:
            out[kind] = 1 - full.sum() / bank.num_layers
    return out


def gather_full(
    bank: MaskBank, getter: Callable[[MaskBank, str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Full (unsharded, detached, fp32) per-kind tensors on every rank.

    ``getter(bank, kind)`` returns the local tensor (log α, its gradient, the current z) in the
    local layout of the module docstring; the result is in the full layout.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    pp_group = ps.get_pipeline_model_parallel_group()
    full = {}
    for kind in bank.kinds:
        local = getter(bank, kind).detach().float()
        if kind == "hidden":
            full[kind] = local.clone()
            continue
        if kind in ("head", "intermediate") and dist.get_world_size(tp_group) > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
            local = torch.cat(parts, dim=1)  # [Ll, a] / [Ll, f]
        full[kind] = gather_rows(local, pp_group)
    return full
