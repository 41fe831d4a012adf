"""The distillation loss over a tensor-parallel vocabulary: KL(teacher || student) per token.

Both models' logits arrive as this TP rank's vocabulary slice ``[s, b, v/tp]`` (the rows
``[rank * v/tp, (rank + 1) * v/tp)`` of the padded vocabulary; padded rows hold ``-inf``). As in
megatron-core's ``vocab_parallel_cross_entropy``, softmax maxima and normalisers are all-reduced
over the TP group (MAX, then SUM), so no rank ever holds full-vocabulary logits; the gradient is
written analytically, ``d KD / d student = T * (p_student - p_teacher)``, on the local slice.

With temperature ``T`` the per-token loss is ``T**2 * KL(softmax(t / T) || softmax(s / T))``
(Hinton et al.'s scaling keeps the gradient size independent of ``T``).

``top_k``: the teacher's k most likely tokens (over the whole vocabulary: each rank's local top-k
candidates, ``[s, b, tp * k]``, are all-gathered over TP) become the target, renormalised over
those k; the student keeps its full-vocabulary softmax. With k equal to the vocabulary size this
is the full KL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()


def _all_reduce(x: torch.Tensor, op, group, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _log_softmax_parallel(logits: torch.Tensor, group, world: int) -> torch.Tensor:
    """Log-softmax over the vocabulary split across the TP group: ``[..., v/tp]`` in and out."""
    local_max = logits.max(dim=-1, keepdim=True).values  # [..., 1]
    maxima = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group, world)
    shifted = logits - maxima
    sums = _all_reduce(shifted.exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group, world)
    return shifted - sums.log()


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p * (log_p - log_q)`` with the convention ``0 * anything = 0`` (padded rows)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, top_k: int | None):
        group, world = _tp_group()
        log_ps = _log_softmax_parallel(student.float() / temperature, group, world)
        teacher = teacher.float() / temperature
        if top_k is None:
            log_pt = _log_softmax_parallel(teacher, group, world)
            target = log_pt.exp()  # [s, b, v/tp]
            kl = _all_reduce(
                _xlogy_diff(target, log_pt, log_ps).sum(dim=-1), dist.ReduceOp.SUM, group, world
            )
        else:
            target, kl = _top_k_target(teacher, log_ps, top_k, group, world)
        ctx.temperature = temperature
        ctx.save_for_backward(log_ps, target)
        return kl * temperature**2  # [s, b]

    @staticmethod
    def backward(ctx, grad_out):
        log_ps, target = ctx.saved_tensors
        t = ctx.temperature
        # d (T^2 KL) / d s = T^2 * (p_s - q) / T
        grad = (log_ps.exp() - target) * (grad_out.unsqueeze(-1) * t)
        return grad, None, None, None


def _top_k_target(
    teacher: torch.Tensor, log_ps: torch.Tensor, k: int, group, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The renormalised top-k teacher distribution on this rank's slice ``[s, b, v/tp]``, and
    ``KL(q || p_s)`` per token ``[s, b]``."""
    from megatron.core import parallel_state as ps

    width = teacher.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * width
    local_vals, local_idx = teacher.topk(min(k, width), dim=-1)  # [s, b, k_l]
    local_idx = local_idx + start
    if world > 1:
        vals = [torch.empty_like(local_vals) for _ in range(world)]
        idx = [torch.empty_like(local_idx) for _ in range(world)]
        dist.all_gather(vals, local_vals.contiguous(), group=group)
        dist.all_gather(idx, local_idx.contiguous(), group=group)
        cand_vals, cand_idx = torch.cat(vals, dim=-1), torch.cat(idx, dim=-1)  # [s, b, tp*k_l]
    else:
        cand_vals, cand_idx = local_vals, local_idx
    vals, pick = cand_vals.topk(min(k, cand_vals.shape[-1]), dim=-1)  # [s, b, k]
    idx = cand_idx.gather(-1, pick)
    log_q = torch.log_softmax(vals, dim=-1)  # identical on every TP rank
    q = log_q.exp()
    mine = (idx >= start) & (idx < start + width)
    local = (idx - start).clamp(0, width - 1)
    q_mine = torch.where(mine, q, torch.zeros_like(q))
    target = torch.zeros_like(log_ps).scatter_add_(-1, local, q_mine)  # [s, b, v/tp]
    cross = _all_reduce(
        torch.where(q_mine > 0, q_mine * log_ps.gather(-1, local), torch.zeros_like(q)).sum(-1),
        dist.ReduceOp.SUM,
        group,
        world,
    )
    neg_entropy = torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(-1)
    return target, neg_entropy - cross


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-token ``T**2 * KL(teacher || student)`` ``[s, b]`` from TP-local logits ``[s, b, v/tp]``.

    Gradients flow into ``student_logits`` only; the teacher's logits are a constant target.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), temperature, top_k)
