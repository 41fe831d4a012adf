"""Per-GPU memory of a megashear job by parallel layout: pure arithmetic on model shapes.

No torch: every figure is a count of bytes derived from a :class:`ModelConfig`, the job and the
layout. The accounting follows Megatron-LM's ``theoretical_memory_usage.py`` and Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), with the saved
tensors of the implementation megashear runs (docs/memory_planner.md gives every formula):

- **weights** ``P_stage / tp`` parameters in the compute dtype; **gradients** megatron-core's
  fp32 grad buffer (``grad_reduce_in_fp32``), 4 bytes per parameter; **optimizer** Adam's two
  fp32 moments, plus an fp32 master copy when the weights are bf16: 12 (bf16) or 8 (fp32) bytes
  per parameter, divided by DP under the distributed optimizer. Together: Megatron's
  18 bytes / parameter (bf16), ``6 + 12 / dp`` with the distributed optimizer.
- **masks** (pruning): the log α of every pruned kind (fp32 parameter, gradient and Adam state,
  sharded like the weights they mask) and the Lagrange multipliers λ (two per kind, own AdamW).
- **teacher** (distillation): the frozen teacher's weights at the same layout, its half of the
  hidden states that travel between stages, and the KD loss's saved ``[T, v/tp]`` tensors.
- **activations**: what autograd saves per micro-batch, per transformer layer (a table per
  implementation: megatron-core's ``local`` spec, which CPU runs and every pruning run use, and
  the TransformerEngine spec ``te``), times the layers on the stage, times the micro-batches in
  flight on it (1F1B: ``min(pp - stage, m)``; interleaved: ``pp + (pp - 1) / vpp``), reduced by
  selective or full recomputation; sequence parallelism divides the ``[T, h]`` tensors by tp.
- **logits**: the cross-entropy's fp32 ``[T, v_pad / tp]`` softmax and the per-token loss
  bookkeeping, on the last stage.

``T = s * b`` is the tokens of one micro-batch. The peak of a layout is the largest stage total
(the first stage holds the most micro-batches in flight, the last the logits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

GIB = 1024**3
RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CATEGORIES = (
    "weights",
    "gradients",
    "optimizer",
    "masks",
    "teacher",
    "activations",
    "logits",
)
# Mask kinds (megashear.pruning.hard_concrete.ALL_KINDS; not imported: that module needs torch).
ROW_KINDS = ("head", "intermediate")
LAYER_KINDS = ("head_layer", "mlp", "layer")
ALL_KINDS = ("hidden", "head", "head_layer", "intermediate", "mlp", "layer")
# Bytes per token of the loss bookkeeping on the last stage: the int64 target, the bool mask of
# targets outside this TP rank's vocabulary slice, the fp32 loss mask.
LOSS_BYTES_PER_TOKEN = 8 + 1 + 4
# The norm's saved 1 / rms per token (fp32 under bf16 too).
RSTD_BYTES = 4
# Relative slowdown per doubling of TP (its all-reduces / all-gathers on the critical path):
# a ranking heuristic, not a measurement.
TP_COST_PER_DOUBLING = 0.05


@dataclass(frozen=True)
class Layout:
    """One parallel layout of ``tp * pp * dp`` GPUs.

    ``recompute`` is megatron-core's ``recompute_granularity`` (``none``, ``selective``: core
    attention, ``full``: whole layers); under ``full``, ``recompute_method`` ``uniform`` keeps
    the input of every group of ``recompute_num_layers`` layers and ``block`` recomputes the
    first ``recompute_num_layers`` layers of each stage.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    recompute: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        """A short name: ``TP2 PP4 DP8 distopt SP recompute=selective``."""
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp:
            parts.append(f"VPP{self.vpp}")
        parts.append(f"DP{self.dp}")
        if self.distributed_optimizer:
            parts.append("distopt")
        if self.sequence_parallel:
            parts.append("SP")
        if self.recompute != "none":
            rc = f"recompute={self.recompute}"
            if self.recompute == "full":
                rc += f"/{self.recompute_method}/{self.recompute_num_layers}"
            parts.append(rc)
        return " ".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Workload:
    """What runs, independent of the layout.

    Args:
        model: the trained model (the source for pruning: the masked model has its shape).
        job: ``train`` or ``prune``.
        kinds: the pruned mask kinds (``prune`` only).
        teacher: the teacher's shape when distilling, else None.
        seq_length, micro_batch_size, global_batch_size: tokens and sequences.
        dtype: ``bf16`` or ``fp32`` weights and compute (megashear trains fp32 on CPU).
        backend: ``te`` (TransformerEngine layers, megashear's GPU training) or ``local``
            (megatron-core's local spec: CPU, and every pruning run).
    """

    model: ModelConfig
    job: Literal["train", "prune"] = "train"
    kinds: tuple[str, ...] = ()
    teacher: ModelConfig | None = None
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 256
    dtype: str = "bf16"
    backend: str = "te"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def implementation(self) -> str:
        # the masked leaves are megatron-core's local spec, on GPU too
        return "local" if self.job == "prune" else self.backend


@dataclass
class Estimate:
    """Per-GPU bytes of one layout at its fullest pipeline stage."""

    layout: Layout
    bytes: dict[str, int]
    stage: int
    cost: float
    fits: bool = False
    stages: list[dict[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.describe(),
            **self.layout.to_dict(),
            "peak_stage": self.stage,
            "bytes": dict(self.bytes),
            "total_bytes": self.total,
            "total_gib": round(self.total / GIB, 2),
            "relative_step_time": round(self.cost, 3),
            "fits": self.fits,
        }


# ---------------------------------------------------------------------------- parameters


def layer_parameters(cfg: ModelConfig, tp: int = 1) -> tuple[int, int]:
    """Parameters of one transformer layer on one TP rank: ``(split, replicated)``.

    ``split``: QKV ``h x (a + 2g) hn``, output projection ``a hn x h``, SwiGLU ``3 h f``, all
    divided by ``tp``; ``replicated``: the two RMSNorm weights ``2h`` (every TP rank).
    """
    h, f, hn = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    split = h * (a + 2 * g) * hn + a * hn * h + 3 * h * f
    return split // tp, 2 * h


def stage_parameters(cfg: ModelConfig, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage ``stage`` (0-based) at ``tp``.

    The stage's ``L / pp`` layers; the first stage the embedding ``[v_pad / tp, h]``; the last
    the final norm ``[h]`` and the output layer ``[v_pad / tp, h]`` (with tied embeddings a
    copy of the embedding when ``pp > 1``, nothing more when ``pp == 1``). Megatron counts the
    padded vocabulary, as the buffers hold it.
    """
    split, replicated = layer_parameters(cfg, tp)
    n = (cfg.num_layers // pp) * (split + replicated)
    emb = cfg.padded_vocab_size * cfg.hidden_size // tp
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += cfg.hidden_size
        if not cfg.tie_word_embeddings or pp > 1:
            n += emb
    return n


def log_alpha_numel(cfg: ModelConfig, kinds: tuple[str, ...], tp: int, pp: int) -> int:
    """log α entries on one GPU: ``hidden [h]`` (every stage), ``head [Ll, a/tp]``,
    ``intermediate [Ll, f/tp]``, ``head_layer``/``mlp``/``layer [Ll]`` (``Ll = L / pp``), as
    :class:`megashear.models.masked.MaskBank` holds them."""
    ll = cfg.num_layers // pp
    rows = {"head": cfg.num_attention_heads // tp, "intermediate": cfg.ffn_hidden_size // tp}
    n = 0
    for kind in kinds:
        if kind == "hidden":
            n += cfg.hidden_size
        elif kind in ROW_KINDS:
            n += ll * rows[kind]
        else:
            n += ll
    return n


# ---------------------------------------------------------------------------- static memory


def static_bytes(work: Workload, lay: Layout, stage: int) -> dict[str, int]:
    """Weights, gradients, optimizer state, masks and the teacher's weights on one GPU of
    ``stage``, in bytes."""
    p = stage_parameters(work.model, lay.tp, lay.pp, stage)
    wb = work.dtype_bytes
    shard = lay.dp if lay.distributed_optimizer else 1
    # Adam's exp_avg and exp_avg_sq (fp32), plus the fp32 master weights of 16-bit params.
    opt_per_param = 8 + (4 if wb < 4 else 0)
    out = {
        "weights": p * wb,
        "gradients": p * 4,
        "optimizer": math.ceil(p * opt_per_param / shard),
        "masks": 0,
        "teacher": 0,
    }
    if work.job == "prune" and work.kinds:
        n = log_alpha_numel(work.model, work.kinds, lay.tp, lay.pp)
        # fp32 log α, its fp32 gradient, Adam state (sharded like the rest); λ: 2 per kind, with
        # a gradient and AdamW's two moments, on every rank.
        out["masks"] = n * 8 + math.ceil(n * 8 / shard) + 2 * len(work.kinds) * 16
    if work.teacher is not None:
        out["teacher"] = stage_parameters(work.teacher, lay.tp, lay.pp, stage) * wb
    return out


# ---------------------------------------------------------------------------- activations


def layer_activation_bytes(work: Workload, lay: Layout) -> dict[str, float]:
    """Bytes autograd keeps per token of a micro-batch for one transformer layer.

    Returns ``{"norm", "full", "input", "selective_saving"}``: one RMSNorm's saved tensors;
    everything the layer saves without recomputation; the layer input alone (what full
    recomputation keeps); what selective (core-attention) recomputation does not keep. Tensors of the sequence region
    (``[T, h]``: norm inputs and outputs, masked projection outputs) are divided by ``tp``
    under sequence parallelism; the TP-split ones (``[T, (a + 2g) hn / tp]``, ``[T, f / tp]``)
    by ``tp`` always.
    """
    cfg, B, t = work.model, work.dtype_bytes, lay.tp
    h, f, hn = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    a, g = cfg.num_attention_heads, cfg.num_query_groups
    seq_div = t if lay.sequence_parallel else 1
    if work.implementation == "local":
        # torch RMSNorm: input, x * rstd, output (the next GEMM's input) and rstd.
        norm = 3 * h * B / seq_div + RSTD_BYTES / seq_div
        # QKV output (its v view is kept), RoPE'd q and k, SDPA output and its fp32 logsumexp,
        # and the contiguous [T, a hn] copy the output projection saves as its input.
        attn = ((a + 2 * g) * hn + a * hn + g * hn + 2 * a * hn) * B / t + 4 * a / t
        # fc1 output [T, 2f], then three [T, f] tensors (silu's input and output, the product
        # that is fc2's input).
        mlp = (2 * f + 3 * f) * B / t
        selective_saving = a * hn * B / t + 4 * a / t
    else:
        # TE LayerNormLinear: input, ln_out, rstd.
        norm = 2 * h * B / seq_div + RSTD_BYTES / seq_div
        # QKV output (v), RoPE'd q and k, attention output (= the projection's input) and lse.
        attn = ((a + 2 * g) * hn + a * hn + g * hn + a * hn) * B / t + 4 * a / t
        # fc1 output (the fused SwiGLU's input) and the SwiGLU output (fc2's input).
        mlp = 3 * f * B / t
        selective_saving = 4 * a / t
    full = 2 * norm + attn + mlp
    out = {"norm": norm}
    if work.job == "prune":
        kinds = set(work.kinds)
        if "head" in kinds:  # the projection's masked input, besides its unmasked input
            full += a * hn * B / t
        if kinds & {"head_layer", "layer", "hidden"}:  # projection output before its gate
            full += h * B / seq_div
        if "intermediate" in kinds:  # fc2's masked input
            full += f * B / t
        if kinds & {"mlp", "layer", "hidden"}:  # fc2 output before its gate
            full += h * B / seq_div
    out.update(full=full, input=h * B / seq_div, selective_saving=selective_saving)
    return out


def in_flight(lay: Layout, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at its peak (megatron-core's schedules).

    No pipeline: 1. 1F1B: ``min(pp - stage, m)`` (the warm-up forwards plus one). Interleaved
    (``vpp`` chunks of ``Ll / vpp`` layers): on the first stage
    ``(2 (pp - 1) + (vpp - 1) pp + 1) / vpp = pp + (pp - 1) / vpp`` layer-stacks of ``Ll``;
    Megatron-LM's ``1 + (pp - 1) / (pp vpp)`` penalty times ``pp``.
    """
    pp = lay.pp
    if pp == 1:
        return 1.0
    if lay.vpp:
        warmup = 2 * (pp - stage - 1) + (lay.vpp - 1) * pp + 1
        return min(warmup, num_microbatches * lay.vpp) / lay.vpp
    return float(min(pp - stage, num_microbatches))


def activation_bytes(work: Workload, lay: Layout, stage: int) -> dict[str, int]:
    """Activations, logits and the teacher's activation share on one GPU of ``stage``."""
    cfg, B, t = work.model, work.dtype_bytes, lay.tp
    m = work.global_batch_size // (lay.dp * work.micro_batch_size)
    tokens = work.seq_length * work.micro_batch_size
    seq_div = t if lay.sequence_parallel else 1
    per = layer_activation_bytes(work, lay)
    ll = cfg.num_layers // lay.pp
    layer_full = per["full"]
    if lay.recompute == "selective":
        layer_full -= per["selective_saving"]
    # One micro-batch's layers on this stage, and the recompute transient (full recomputation
    # rebuilds one group's activations in the backward, one micro-batch at a time).
    transient = 0.0
    if lay.recompute == "full":
        n = lay.recompute_num_layers or 1
        if lay.recompute_method == "block":
            k = min(n, ll)
            stack = k * per["input"] + (ll - k) * layer_full
            transient = layer_full if k else 0.0
        else:
            groups = math.ceil(ll / n)
            stack = groups * per["input"]
            transient = min(n, ll) * layer_full
    else:
        stack = ll * layer_full
    first, last = stage == 0, stage == lay.pp - 1
    extra = 0.0
    if first:
        extra += 8  # the int64 tokens the embedding keeps
        if work.job == "prune" and "hidden" in work.kinds:
            extra += cfg.hidden_size * B / seq_div  # the embedding output, before z_hidden
    if last:
        extra += per["norm"]  # the final norm
    mb = in_flight(lay, stage, m)
    acts = (stack + extra) * tokens * mb + transient * tokens
    # RoPE's cos / sin [s, hn] (fp32), cached and shared by the layers of a stage.
    acts += 2 * work.seq_length * cfg.head_dim * 4
    out = {"activations": int(acts), "logits": 0, "teacher": 0}
    if last:
        out["logits"] = int(tokens * (4 * cfg.padded_vocab_size / t + LOSS_BYTES_PER_TOKEN))
    if work.teacher is not None:
        teacher = 0.0
        if not first:  # the teacher's half of every received [s, b, h_s + h_t] activation
            teacher += work.teacher.hidden_size * B / seq_div * tokens * mb
        if last:  # the KD loss keeps the student's softmax and the teacher's target, fp32
            teacher += 2 * 4 * work.model.padded_vocab_size / t * tokens
        out["teacher"] = int(teacher)
    return out


# ---------------------------------------------------------------------------- estimates


def check_layout(work: Workload, lay: Layout) -> None:
    """Raise a one-line ``ValueError`` when megatron-core cannot run ``lay`` for ``work``."""
    cfg = work.model
    if min(lay.tp, lay.pp, lay.dp) < 1:
        raise ValueError(f"tp, pp and dp must be >= 1: {lay.describe()}")
    if lay.sequence_parallel and lay.tp < 2:
        raise ValueError("sequence parallelism splits over the TP group: it needs tp >= 2")
    if lay.recompute not in RECOMPUTE_GRANULARITIES:
        raise ValueError(
            f"recompute {lay.recompute!r} is not one of {list(RECOMPUTE_GRANULARITIES)}"
        )
    if lay.recompute == "full":
        if lay.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(
                f"full recomputation needs recompute_method {list(RECOMPUTE_METHODS)}, "
                f"got {lay.recompute_method!r}"
            )
        if not lay.recompute_num_layers or lay.recompute_num_layers < 1:
            raise ValueError("full recomputation needs recompute_num_layers >= 1")
        if lay.recompute_num_layers > cfg.num_layers // lay.pp:
            raise ValueError(
                f"recompute_num_layers {lay.recompute_num_layers} exceeds the "
                f"{cfg.num_layers // lay.pp} layers of a pipeline stage"
            )
    elif lay.recompute_method is not None or lay.recompute_num_layers is not None:
        raise ValueError(
            "recompute_method and recompute_num_layers go with recompute=full only, "
            f"not recompute={lay.recompute}"
        )
    for name, value in (
        ("attention heads", cfg.num_attention_heads),
        ("query groups", cfg.num_query_groups),
        ("FFN size", cfg.ffn_hidden_size),
        ("padded vocabulary", cfg.padded_vocab_size),
    ):
        if value % lay.tp:
            raise ValueError(f"{name} {value} not divisible by tp {lay.tp}")
    stages = lay.pp * (lay.vpp or 1)
    if cfg.num_layers % stages:
        raise ValueError(f"{cfg.num_layers} layers not divisible by pp x vpp = {stages}")
    if lay.vpp is not None and (lay.pp < 2 or lay.vpp < 2):
        raise ValueError("virtual pipeline stages need pp >= 2 and vpp >= 2")
    if lay.vpp is not None and work.job == "prune":
        raise ValueError("pruning does not support virtual pipeline stages (vpp)")
    per_step = lay.dp * work.micro_batch_size
    if work.global_batch_size % per_step:
        raise ValueError(
            f"global batch {work.global_batch_size} not divisible by dp {lay.dp} x micro batch "
            f"{work.micro_batch_size}"
        )
    if lay.vpp is not None and (work.global_batch_size // per_step) % lay.pp:
        raise ValueError("the interleaved schedule needs a multiple of pp micro-batches")
    if work.teacher is not None:
        t = work.teacher
        for name, value in (
            ("teacher heads", t.num_attention_heads),
            ("teacher query groups", t.num_query_groups),
            ("teacher FFN size", t.ffn_hidden_size),
        ):
            if value % lay.tp:
                raise ValueError(f"{name} {value} not divisible by tp {lay.tp}")
        if t.num_layers % stages:
            raise ValueError(f"teacher's {t.num_layers} layers not divisible by {stages} stages")


def stage_bytes(work: Workload, lay: Layout, stage: int) -> dict[str, int]:
    """Every category of :data:`CATEGORIES` on one GPU of pipeline stage ``stage``."""
    out = static_bytes(work, lay, stage)
    act = activation_bytes(work, lay, stage)
    out["teacher"] += act.pop("teacher")
    out.update(act)
    return {k: out[k] for k in CATEGORIES}


def relative_step_time(work: Workload, lay: Layout) -> float:
    """A ranking score, 1.0 for one GPU's ideal step: recomputation's extra forward FLOPs,
    the pipeline bubble ``(pp - 1) / (vpp m)`` and a TP communication penalty."""
    cfg = work.model
    split, _ = layer_parameters(cfg)
    s = work.seq_length
    # forward FLOPs per token of one layer: GEMMs, and core attention (QK^T and AV)
    gemm = 2 * split
    core = 4 * s * cfg.num_attention_heads * cfg.head_dim
    if lay.recompute == "selective":
        extra = core / (3 * (gemm + core))
    elif lay.recompute == "full":
        ll = cfg.num_layers // lay.pp
        share = 1.0 if lay.recompute_method != "block" else min(lay.recompute_num_layers, ll) / ll
        extra = share / 3
    else:
        extra = 0.0
    m = work.global_batch_size // (lay.dp * work.micro_batch_size)
    bubble = (lay.pp - 1) / ((lay.vpp or 1) * m)
    comm = TP_COST_PER_DOUBLING * math.log2(lay.tp)
    return (1 + extra) * (1 + bubble) * (1 + comm)


def estimate(work: Workload, lay: Layout, gpu_bytes: float | None = None) -> Estimate:
    """The per-GPU bytes of ``lay`` at its fullest stage (checked with :func:`check_layout`)."""
    check_layout(work, lay)
    stages = [stage_bytes(work, lay, k) for k in range(lay.pp)]
    peak = max(range(lay.pp), key=lambda k: sum(stages[k].values()))
    est = Estimate(lay, stages[peak], peak, relative_step_time(work, lay), stages=stages)
    est.fits = gpu_bytes is not None and est.total <= gpu_bytes
    return est


def candidate_layouts(
    work: Workload,
    gpus: int,
    gpus_per_node: int = 8,
    fixed: dict | None = None,
) -> list[Layout]:
    """Every layout of ``gpus`` GPUs megatron-core can run for ``work`` (TP within a node,
    powers of two), restricted to the ``fixed`` field values (a :class:`Layout` field name ->
    value; absent or None: all values tried)."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    cfg = work.model
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and gpus % t == 0]
    for tp in tps:
        for pp in range(1, cfg.num_layers + 1):
            if gpus % (tp * pp) or cfg.num_layers % pp:
                continue
            dp = gpus // (tp * pp)
            vpps: list[int | None] = [None]
            if pp > 1 and work.job != "prune":
                vpps += [v for v in (2, 4) if cfg.num_layers % (pp * v) == 0]
            sps = [False, True] if tp > 1 else [False]
            if fixed.get("sequence_parallel"):
                sps = [True]
            recomputes: list[tuple[str, str | None, int | None]] = [
                ("none", None, None),
                ("selective", None, None),
                ("full", "uniform", 1),
            ]
            for vpp in vpps:
                for dist_opt in [False, True] if dp > 1 else [False]:
                    for sp in sps:
                        for rc in recomputes:
                            lay = Layout(tp, pp, dp, vpp, dist_opt, sp, *rc)
                            if fixed and any(
                                getattr(lay, k) != v
                                for k, v in fixed.items()
                                if k not in ("recompute_method", "recompute_num_layers")
                            ):
                                continue
                            if fixed.get("recompute") == "full":
                                lay = dataclasses.replace(
                                    lay,
                                    recompute_method=fixed.get("recompute_method", "uniform"),
                                    recompute_num_layers=fixed.get("recompute_num_layers", 1),
                                )
                            try:
                                check_layout(work, lay)
                            except ValueError:
                                continue
                            out.append(lay)
    return out


def plan_layouts(
    work: Workload,
    gpus: int,
    gpu_memory_gib: float,
    gpus_per_node: int = 8,
    fixed: dict | None = None,
) -> list[Estimate]:
    """Every candidate layout's estimate, the ones that fit in ``gpu_memory_gib`` first,
    fastest first (:func:`relative_step_time`, then less memory)."""
    budget = gpu_memory_gib * GIB
    estimates = [
        estimate(work, lay, budget) for lay in candidate_layouts(work, gpus, gpus_per_node, fixed)
    ]
    estimates.sort(key=lambda e: (not e.fits, round(e.cost, 6), e.total))
    return estimates
