"""Hard-concrete masks (Louizos et al. 2018) as used by Sheared-LLaMA: pure torch, no megatron.

Every mask entry has a learnable ``log α``. Constants (docs/method.md §2): β = 2/3, stretch limits
l = -0.1 and r = 1.1, ε = 1e-6; ``log α`` is initialised N(5, 0.01) and clamped to
[ln 0.01, ln 100] whenever it is used (importance-initialised masks: [ln 1e-4, ln 100], see
:func:`log_alpha_floor`; every function takes the floor as ``floor``).

Full (unsharded) mask layouts, shared by every module of :mod:`megashear.pruning`:

================  ==========  ==========================================================
kind              shape       what it multiplies
================  ==========  ==========================================================
``hidden``        ``[h]``     embeddings, every RMSNorm output, every block output
``head``          ``[L, a]``  each query head's attention output, before ``o``
``head_layer``    ``[L]``     the attention block output
``intermediate``  ``[L, f]``  the SwiGLU activations, before ``down``
``mlp``           ``[L]``     the MLP block output
``layer``         ``[L]``     both block outputs of a layer
================  ==========  ==========================================================

A "mask dict" maps a subset of these kinds to full tensors; an absent kind means "all ones".

Clamping: every function here evaluates ``log α`` through :func:`clamp_log_alpha`, a
straight-through clamp (value clamped, gradient passed as is), so the value and the gradient are
those the reference code gets after its in-place ``z_loga.data.clamp_``. The stored parameter
itself is kept in range by calling :func:`clamp_log_alpha_` after each optimizer step.

Deterministic masks (evaluation and finalisation): ``soft = σ(log α / β · 0.8)``; the ``k``
smallest soft values are set to 0 and the survivors keep their soft value (e.g. 0.996). ``k`` is
``size - keep`` when a kept size is given, otherwise the rounded expected number of zeros.
Two-dimensional kinds (``head``, ``intermediate``) select per row (per layer) by default;
one-dimensional kinds select globally.

GQA (``g < a`` key/value groups, ``r = a / g`` query heads per group; query head ``j`` belongs
to group ``j // r``): the ``head`` mask stays a mask over query heads ``[L, a]`` (sampled and
trained exactly like MHA). Only the deterministic selection at a target shape knows about
groups: for a target of ``a'`` heads in ``g'`` groups (``r' = a'/g'``), each layer keeps, in each
group, its ``r'`` best heads (largest soft value); the group score is the sum of those ``r'``
soft values, and the ``g'`` best groups are kept. Every kept group thus has exactly ``r'`` query
heads, and a key/value group is removed only when all of its query heads are removed, so the
result is a standard GQA LLaMA. The expected head sparsity (over query heads) has the same
meaning as for MHA: a target of ``a'`` heads is a target sparsity of ``1 - a'/a``.

Layer-level kinds at a target: a uniform LLaMA cannot drop a layer's attention and keep its MLP,
so when more than one of ``layer``/``head_layer``/``mlp`` is given a target size, the kept
layers are selected jointly (score = sum of their soft values) and all of them keep the same
layers, each with its own soft values.

Sampling noise: :func:`mask_noise` draws ``U(ε, 1-ε)`` over the FULL unsharded length from a
``torch.Generator`` seeded by a SHA-256 hash of (seed, iteration, micro-batch, global layer,
kind); callers slice it, so samples are identical for every TP/PP layout and every process.
"""

from __future__ import annotations

import hashlib
import logging
import math

import torch

logger = logging.getLogger(__name__)

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
EPS = 1e-6
MAGIC = 0.8  # soft = σ(log α / β · MAGIC) for deterministic masks (reference code)
INIT_MEAN = 5.0
INIT_STD = 0.01
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
# the clamp's floor for importance-initialised masks (docs/method.md §8): low enough that the
# dropped units can start just below each kind's target expected sparsity
IMPORTANCE_LOG_ALPHA_MIN = math.log(1e-4)

ALL_KINDS = ("hidden", "head", "head_layer", "intermediate", "mlp", "layer")
PAPER_KINDS = ("head", "intermediate", "layer", "hidden")
ROW_KINDS = ("head", "intermediate")  # [L, n]: one row per layer
LAYER_KINDS = ("layer", "head_layer", "mlp")  # [L]


def log_alpha_shapes(
    hidden_size: int, num_heads: int, ffn_hidden_size: int, num_layers: int
) -> dict[str, tuple[int, ...]]:
    """Kind -> shape of its log α: ``hidden [h]``, ``head [L, a]``, ``intermediate [L, f]``,
    layer-level kinds ``[L]`` (pass a TP rank's ``a``/``f`` and a stage's ``L`` for a shard)."""
    rows = {"head": num_heads, "intermediate": ffn_hidden_size}
    shapes: dict[str, tuple[int, ...]] = {"hidden": (hidden_size,)}
    for kind in ALL_KINDS[1:]:
        shapes[kind] = (num_layers, rows[kind]) if kind in ROW_KINDS else (num_layers,)
    return shapes


def init_log_alpha(
    shape: tuple[int, ...] | torch.Size,
    mean: float = INIT_MEAN,
    std: float = INIT_STD,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A new ``log α`` tensor of ``shape`` drawn from N(mean, std) (reference: N(5, 0.01))."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    return out.normal_(mean, std, generator=generator)


def log_alpha_floor(init: str) -> float:
    """The clamp's floor for masks initialised by ``init``: the paper's ln 0.01 for ``paper``,
    :data:`IMPORTANCE_LOG_ALPHA_MIN` for ``importance`` (a departure, docs/method.md §8)."""
    if init == "importance":
        return IMPORTANCE_LOG_ALPHA_MIN
    if init == "paper":
        return LOG_ALPHA_MIN
    raise ValueError(f"unknown mask init {init!r}; choose paper or importance")


def clamp_log_alpha(log_alpha: torch.Tensor, floor: float = LOG_ALPHA_MIN) -> torch.Tensor:
    """``log α`` clamped to [floor, ln 100] (paper: floor ln 0.01) in value, with an identity
    gradient."""
    clamped = log_alpha.detach().clamp(floor, LOG_ALPHA_MAX)
    return log_alpha + (clamped - log_alpha.detach())


@torch.no_grad()
def clamp_log_alpha_(log_alpha: torch.Tensor, floor: float = LOG_ALPHA_MIN) -> torch.Tensor:
    """Clamp a stored ``log α`` in place to [floor, ln 100] (call after every optimizer step)."""
    return log_alpha.clamp_(floor, LOG_ALPHA_MAX)


def sample_mask(
    log_alpha: torch.Tensor, u: torch.Tensor, floor: float = LOG_ALPHA_MIN
) -> torch.Tensor:
    """Training sample ``z`` (same shape as ``log_alpha``), differentiable in ``log α``.

    ``s = σ((log u - log(1-u) + log α) / β)``, ``z = min(1, max(0, s·(r-l) + l))``.

    Args:
        log_alpha: any shape.
        u: uniform noise in (ε, 1-ε), same shape (see :func:`mask_noise`).
        floor: the clamp's floor (:func:`log_alpha_floor`).
    """
    la = clamp_log_alpha(log_alpha, floor)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor, floor: float = LOG_ALPHA_MIN) -> torch.Tensor:
    """``P(z ≠ 0) = 1 - Q(0)``, ``Q(0) = clamp(σ(β·log(-l/r) - log α), ε, 1-ε)``; same shape."""
    la = clamp_log_alpha(log_alpha, floor)
    q0 = torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - la).clamp(EPS, 1 - EPS)
    return 1 - q0


def log_alpha_for_keep_probability(p: torch.Tensor | float) -> torch.Tensor:
    """The ``log α`` whose ``P(z ≠ 0)`` is ``p`` (the inverse of :func:`keep_probability`
    inside the clamp): ``log α = logit(p) + β·log(-l/r)``."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.logit(p) + BETA * math.log(-LIMIT_L / LIMIT_R)


def expected_sparsity(log_alpha: torch.Tensor, floor: float = LOG_ALPHA_MIN) -> torch.Tensor:
    """Expected sparsity ``1 - Σ P(z≠0) / size`` over the last dim.

    Shapes: ``[L, n] -> [L]`` (per layer), ``[n] -> []``.

    For the layer-level kinds ``[L]`` this is the scalar sparsity over layers.
    """
    keep = keep_probability(log_alpha, floor)
    return 1 - keep.sum(-1) / log_alpha.shape[-1]


def soft_mask(log_alpha: torch.Tensor, floor: float = LOG_ALPHA_MIN) -> torch.Tensor:
    """Deterministic soft values ``σ(log α / β · 0.8)``; same shape."""
    return torch.sigmoid(clamp_log_alpha(log_alpha, floor) / BETA * MAGIC)


def _zero_smallest(soft: torch.Tensor, num_zeros: int) -> torch.Tensor:
    """``soft`` (1-D) with its ``num_zeros`` smallest entries set to 0."""
    num_zeros = max(0, min(int(num_zeros), soft.numel()))
    out = soft.clone()
    if num_zeros > 0:
        idx = torch.topk(soft, k=num_zeros, largest=False).indices
        out[idx] = 0.0
    return out


def _expected_zeros(log_alpha: torch.Tensor, floor: float) -> int:
    return round(log_alpha.numel() - float(keep_probability(log_alpha, floor).sum()))


@torch.no_grad()
def deterministic_mask(
    log_alpha: torch.Tensor,
    keep: int | None = None,
    per_row: bool = True,
    pinned: list[int] | tuple[int, ...] = (),
    floor: float = LOG_ALPHA_MIN,
) -> torch.Tensor:
    """Deterministic mask of one kind (no gradient).

    Args:
        log_alpha: ``[n]`` or ``[L, n]``.
        keep: entries kept (per row when ``per_row`` and 2-D; in total otherwise). ``None`` keeps
            the rounded expected number (computed per row or in total likewise).
        per_row: for 2-D input, select within each row (per layer) instead of globally.
        pinned: entries of a 1-D mask that are always kept, with value exactly 1 (the pinned
            hidden channels, docs/method.md §8).
        floor: the clamp's floor (:func:`log_alpha_floor`).

    Returns:
        Same shape: soft values on survivors, 0 elsewhere.
    """
    if pinned:
        if log_alpha.dim() != 1:
            raise ValueError("only a one-dimensional mask (hidden) can have pinned entries")
        idx = torch.as_tensor(list(pinned), dtype=torch.long)
        k = _expected_zeros(log_alpha, floor) if keep is None else log_alpha.numel() - keep
        rank = soft_mask(log_alpha, floor).clone()
        rank[idx] = 2.0  # above every soft value: selected first
        out = _zero_smallest(rank, k)
        out[idx] = torch.where(out[idx] != 0, 1.0, 0.0)
        return out
    soft = soft_mask(log_alpha, floor)
    if log_alpha.dim() == 2 and per_row:
        rows = []
        for i in range(log_alpha.shape[0]):
            k = _expected_zeros(log_alpha[i], floor) if keep is None else log_alpha.shape[1] - keep
            rows.append(_zero_smallest(soft[i], k))
        return torch.stack(rows)
    k = _expected_zeros(log_alpha, floor) if keep is None else log_alpha.numel() - keep
    return _zero_smallest(soft.reshape(-1), k).reshape(soft.shape)


@torch.no_grad()
def grouped_head_mask(
    log_alpha: torch.Tensor,
    num_query_groups: int,
    keep_groups: int,
    heads_per_group: int,
    floor: float = LOG_ALPHA_MIN,
) -> torch.Tensor:
    """Deterministic GQA head mask: per layer, ``keep_groups`` groups × ``heads_per_group`` heads.

    Args:
        log_alpha: ``[L, a]`` over query heads; head ``j`` is in group ``j // (a/g)``.
        num_query_groups: source groups ``g``.
        keep_groups: target groups ``g'``.
        heads_per_group: target query heads per group ``r'``.
        floor: the clamp's floor (:func:`log_alpha_floor`).

    Returns:
        ``[L, a]``: soft values on the kept heads, 0 elsewhere (see module docstring).
    """
    soft = soft_mask(log_alpha, floor)
    return soft * select_grouped_heads(soft, num_query_groups, keep_groups, heads_per_group)


@torch.no_grad()
def select_grouped_heads(
    score: torch.Tensor, num_query_groups: int, keep_groups: int, heads_per_group: int
) -> torch.Tensor:
    """The GQA head selection of :func:`grouped_head_mask` for any per-head score.

    Args:
        score: ``[L, a]``, larger is better; head ``j`` is in group ``j // (a/g)``.
        num_query_groups: source groups ``g``.
        keep_groups: target groups ``g'``.
        heads_per_group: target query heads per group ``r'``.

    Returns:
        ``[L, a]`` bool: per layer, the ``r'`` best heads of each of the ``g'`` groups whose
        ``r'`` best heads score highest in sum.
    """
    n_layers, a = score.shape
    g = num_query_groups
    if a % g or keep_groups > g or heads_per_group > a // g:
        raise ValueError(
            f"cannot keep {keep_groups} groups x {heads_per_group} heads of {g} groups x {a // g}"
        )
    grouped = score.view(n_layers, g, a // g)  # [L, g, r]
    top = torch.topk(grouped, k=heads_per_group, dim=-1)  # [L, g, r']
    group_score = top.values.sum(-1)  # [L, g]
    groups = torch.topk(group_score, k=keep_groups, dim=-1).indices  # [L, g']
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, top.indices, True)  # best r' heads of every group
    group_keep = torch.zeros(n_layers, g, dtype=torch.bool, device=score.device)
    group_keep.scatter_(-1, groups, True)
    keep &= group_keep[:, :, None]
    return keep.view(n_layers, a)


@torch.no_grad()
def deterministic_masks(
    log_alpha: dict[str, torch.Tensor],
    sizes: dict[str, int] | None = None,
    *,
    num_query_groups: int | None = None,
    target_query_groups: int | None = None,
    per_row: bool = True,
    pinned_hidden: list[int] | tuple[int, ...] = (),
    floor: float = LOG_ALPHA_MIN,
) -> dict[str, torch.Tensor]:
    """Deterministic masks of every kind from full ``log α`` tensors.

    Args:
        log_alpha: kind -> full ``log α`` (``hidden [h]``, ``head [L, a]``, ``intermediate
            [L, f]``, layer-level kinds ``[L]``).
        sizes: kind -> kept entries (per layer for ``head``/``intermediate``: ``a'`` and
            ``f'``; ``L'`` for layer-level kinds; ``h'`` for ``hidden``). Kinds without a size,
            or ``sizes=None``, keep the rounded expected number.
        num_query_groups: source key/value groups ``g``; with ``g < a`` and a ``head`` size,
            heads are selected group-wise (module docstring).
        target_query_groups: target groups ``g'``; default ``g`` (every group keeps ``a'/g``).
        per_row: select ``head``/``intermediate`` per layer (default) or globally (then a given
            size is per layer and the global budget is ``L`` times it).
        pinned_hidden: hidden channels always kept with value 1 (:func:`deterministic_mask`).
        floor: the clamp's floor (:func:`log_alpha_floor`).

    Returns:
        kind -> mask of the same shape: soft values on survivors, 0 elsewhere.
    """
    sizes = dict(sizes or {})
    out: dict[str, torch.Tensor] = {}
    for kind, la in log_alpha.items():
        keep = sizes.get(kind)
        if kind == "head" and keep is not None and num_query_groups is not None:
            a = la.shape[-1]
            g = num_query_groups
            if g < a:
                g_t = g if target_query_groups is None else target_query_groups
                if keep % g_t:
                    raise ValueError(f"target heads {keep} not divisible by target groups {g_t}")
                out[kind] = grouped_head_mask(la, g, g_t, keep // g_t, floor)
                continue
        if la.dim() == 2 and not per_row and keep is not None:
            keep = keep * la.shape[0]
        pinned = pinned_hidden if kind == "hidden" else ()
        out[kind] = deterministic_mask(la, keep, per_row=per_row, pinned=pinned, floor=floor)
    joint = [k for k in LAYER_KINDS if k in log_alpha and sizes.get(k) is not None]
    if len(joint) > 1:
        n_keep = {sizes[k] for k in joint}
        if len(n_keep) > 1:
            raise ValueError(f"layer-level kinds {joint} need equal target sizes, got {sizes}")
        score = sum(soft_mask(log_alpha[k], floor) for k in joint)  # [L]
        kept = torch.zeros_like(score, dtype=torch.bool)
        kept[torch.topk(score, k=n_keep.pop()).indices] = True
        for k in joint:
            out[k] = soft_mask(log_alpha[k], floor) * kept
    return out


def noise_seed(seed: int, iteration: int, microbatch: int, global_layer: int, kind: str) -> int:
    """A 63-bit generator seed from a SHA-256 of the keys (stable across processes)."""
    key = f"megashear-mask-noise|{int(seed)}|{int(iteration)}|{int(microbatch)}|"
    key += f"{int(global_layer)}|{kind}"
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mask_noise(
    seed: int,
    iteration: int,
    microbatch: int,
    global_layer: int,
    kind: str,
    length: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform noise ``U(ε, 1-ε)`` of the FULL unsharded ``length``: ``[length]`` on CPU.

    The same keys give the same tensor in every process; callers take their TP slice.
    ``global_layer`` is the 0-based layer index (any int, e.g. -1 for the hidden mask).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(noise_seed(seed, iteration, microbatch, global_layer, kind))
    u = torch.rand(length, generator=gen, dtype=torch.float64)
    return (u * (1 - 2 * EPS) + EPS).to(dtype)
