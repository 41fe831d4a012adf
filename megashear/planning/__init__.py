"""Planning a run before it starts: which parallel layout fits a model in GPU memory.

:mod:`megashear.planning.memory` is the arithmetic (no torch); :class:`PlanConfig` is the
``megashear plan`` command's config (the command itself is :mod:`megashear.jobs.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megashear.config import MaskKind


@dataclass
class PlanLayoutConfig:
    """Layout fields the plan must keep; null: every value is tried."""

    tp: int | None = None
    """Tensor-parallel size (megatron --tensor-model-parallel-size); null: 1, 2, 4, 8 within a
    node."""
    pp: int | None = None
    """Pipeline-parallel size (megatron --pipeline-model-parallel-size); null: every divisor of
    the layers."""
    vpp: int | None = None
    """Virtual pipeline chunks per pipeline rank (interleaved 1F1B); null: none, 2 and 4 tried
    for train."""
    use_distributed_optimizer: bool | None = None
    """Shard the optimizer state over DP (megatron --use-distributed-optimizer); null: both."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism over TP (needs tp >= 2); null: both."""
    recompute_granularity: Literal["none", "selective", "full"] | None = None
    """Activation recomputation (megatron --recompute-granularity): none, selective (core
    attention) or full (whole layers); null: all three."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Full recomputation only (megatron --recompute-method): uniform groups or the first
    layers of each stage; null: uniform."""
    recompute_num_layers: int | None = None
    """Full recomputation only (megatron --recompute-num-layers): layers per group (uniform)
    or recomputed per stage (block); null: 1."""


@dataclass
class PlanConfig:
    """``megashear plan``: per-GPU memory of a job by layout, and the layouts that fit."""

    source: str = "llama2-7b"
    """The source model: a preset (megashear.model_config.PRESETS) or a checkpoint directory."""
    target: str = ""
    """The pruning target (or the model train trains): a target preset (sheared-llama-1.3b),
    a model preset (llama3.2-3b) or a checkpoint directory; "": the target_* fields, or the
    source."""
    target_num_layers: int | None = None
    """Target transformer layers; null: the target preset's or the source's."""
    target_hidden_size: int | None = None
    """Target model width; null: the target preset's or the source's."""
    target_num_attention_heads: int | None = None
    """Target query heads; null: the target preset's or the source's."""
    target_num_query_groups: int | None = None
    """Target key/value groups; null: the preset's, else the source's heads per group kept."""
    target_ffn_hidden_size: int | None = None
    """Target SwiGLU width; null: the target preset's or the source's."""
    job: Literal["prune", "train"] = "prune"
    """prune: the masked source learns masks toward the target; train: the target (or the
    source when there is none) is trained."""
    teacher: bool = False
    """Distil from the source model (a frozen teacher at the same layout)."""
    kinds: tuple[MaskKind, ...] = ("head", "intermediate", "layer", "hidden")
    """Mask kinds pruned (those the target does not shrink are dropped, as the run does)."""
    seq_length: int | None = None
    """Tokens per sequence; null: the source's seq_length."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one DP rank (megatron --micro-batch-size)."""
    global_batch_size: int = 32
    """Sequences per optimizer step (megatron --global-batch-size; Sheared-LLaMA pruning: 32)."""
    gpus: int = 8
    """GPUs the job runs on (tp x pp x dp)."""
    gpus_per_node: int = 8
    """GPUs per node: TP stays within a node."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (A100-80GB, H100-80GB: 80)."""
    usable_fraction: float = 0.9
    """Share of the GPU memory the plan may fill (CUDA context, NCCL buffers, allocator
    fragmentation and transients take the rest)."""
    dtype: Literal["bf16", "fp32"] = "bf16"
    """Weights and compute (megashear trains fp32 on CPU, bf16 on GPU)."""
    backend: Literal["te", "local"] = "te"
    """Layer implementation of train: te (TransformerEngine, GPU) or local (megatron-core's
    local spec, CPU); prune always runs the local spec."""
    top: int = 5
    """Fitting layouts listed, fastest first."""
    layout: PlanLayoutConfig = field(default_factory=PlanLayoutConfig)
    """Layout fields to keep fixed."""
