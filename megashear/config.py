"""Run settings as dataclasses: parallel layout, training and checkpointing.

Model shapes live in :mod:`megashear.model_config`. Every field has a default that runs on a
laptop CPU; YAML files and command-line overrides fill them in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Parallel layout. The data-parallel size is derived: world size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class TrainConfig:
    """Optimisation settings (megatron names where they exist)."""

    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 20
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 2
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool | None = None  # None: bf16 on GPU, fp32 on CPU
    log_interval: int = 1


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint."""

    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int = 2
