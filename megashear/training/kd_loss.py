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


def _softmax_parallel(logits: torch.Tensor, group, world: int):
    """Softmax over the vocabulary split across the TP group.

    ``[..., v/tp]`` -> (probabilities ``[..., v/tp]``, in a new buffer; log-normaliser ``[...]``
    such that ``log p = logits - lse``).
    """
    maxima = _all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group, world)  # [...]
    probs = torch.sub(logits, maxima.unsqueeze(-1)).exp_()
    sums = _all_reduce(probs.sum(dim=-1), dist.ReduceOp.SUM, group, world)
    probs.div_(sums.unsqueeze(-1))
    return probs, maxima + sums.log()


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, top_k: int | None, valid: int):
        group, world = _tp_group()
        width = student.shape[-1]
        # the padded rows (-inf in both models) take no part: a view of the real ones
        s, t = student[..., :valid].float(), teacher[..., :valid].float()
        if temperature != 1.0:
            s, t = s / temperature, t / temperature
        p_s, lse_s = _softmax_parallel(s, group, world)
        if top_k is None:
            target, lse_t = _softmax_parallel(t, group, world)
            # KL = sum p_t (t - lse_t - s + lse_s) = sum p_t (t - s) + lse_s - lse_t
            cross = _all_reduce(
                torch.sub(t, s).mul_(target).sum(dim=-1), dist.ReduceOp.SUM, group, world
            )
            kl = cross + lse_s - lse_t
        else:
            target, kl = _top_k_target(t, s, lse_s, top_k, width, group, world)
        ctx.temperature, ctx.width = temperature, width
        ctx.save_for_backward(p_s, target)
        return kl * temperature**2  # [s, b]

    @staticmethod
    def backward(ctx, grad_out):
        p_s, target = ctx.saved_tensors
        # d (T^2 KL) / d s = T^2 * (p_s - q) / T; in place: the graph is used once
        grad = p_s.sub_(target).mul_(grad_out.unsqueeze(-1) * ctx.temperature)
        if grad.shape[-1] != ctx.width:
            grad = torch.nn.functional.pad(grad, (0, ctx.width - grad.shape[-1]))
        return grad, None, None, None, None


def _top_k_target(
    teacher: torch.Tensor,
    student: torch.Tensor,
    lse_s: torch.Tensor,
    k: int,
    width: int,
    group,
    world: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The renormalised top-k teacher distribution on this rank's (real) rows ``[s, b, v']``,
    and ``KL(q || p_s)`` per token ``[s, b]``; ``width`` is the padded slice width."""
    from megatron.core import parallel_state as ps

    start = ps.get_tensor_model_parallel_rank() * width
    rows = teacher.shape[-1]
    local_vals, local_idx = teacher.topk(min(k, rows), dim=-1)  # [s, b, k_l]
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
    mine = (idx >= start) & (idx < start + rows)
    local = (idx - start).clamp(0, rows - 1)
    q_mine = torch.where(mine, q, torch.zeros_like(q))
    target = torch.zeros_like(student).scatter_add_(-1, local, q_mine)  # [s, b, v']
    # sum_j q_j log p_s(j), with log p_s = s - lse_s and sum_j q_j = 1
    cross = _all_reduce(
        (q_mine * student.gather(-1, local)).sum(-1), dist.ReduceOp.SUM, group, world
    )
    neg_entropy = torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(-1)
    return target, neg_entropy - cross + lse_s


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``T**2 * KL(teacher || student)`` ``[s, b]`` from TP-local logits ``[s, b, v/tp]``.

    ``vocab_size``: the real (unpadded) vocabulary; the padded rows beyond it are left out
    (None: no padding). Gradients flow into ``student_logits`` only; the teacher's logits are a
    constant target.
    """
    from megatron.core import parallel_state as ps

    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    width = student_logits.shape[-1]
    valid = width
    if vocab_size is not None:
        start = ps.get_tensor_model_parallel_rank() * width
        valid = max(0, min(width, vocab_size - start))
    return _VocabParallelKL.apply(
        student_logits, teacher_logits.detach(), temperature, top_k, valid
    )
