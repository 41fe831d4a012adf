"""Run settings as dataclasses: parallel layout, training and checkpointing.

Model shapes live in :mod:`megashear.model_config`. Every field has a default that runs on a
laptop CPU; YAML files and command-line overrides fill them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megashear.model_config import ModelConfig


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


@dataclass
class PruningConfig:
    """Targeted structured pruning (REFERENCE §2-3).

    ``target`` is a preset name (``sheared-llama-1.3b``, ...) or empty when the target shape is
    given by the ``target_*`` fields.
    """

    target: str = ""
    target_num_layers: int | None = None
    target_hidden_size: int | None = None
    target_num_attention_heads: int | None = None
    target_num_query_groups: int | None = None
    target_ffn_hidden_size: int | None = None
    kinds: tuple[str, ...] = ("head", "intermediate", "layer", "hidden")
    lagrangian_warmup_steps: int = 640
    lr_log_alpha: float = 1.0
    lr_lambda: float = 1.0
    log_alpha_init_mean: float = 5.0
    seed: int = 17


@dataclass
class DataConfig:
    """Training data: a domain manifest (``tools/preprocess_data.py``), one token stream, or
    synthetic tokens."""

    manifest: str = ""
    token_file: str = ""  # one pre-tokenized stream (.npy of token ids), no domains
    synthetic: bool = False
    update_rule: str = "paper"  # paper | reference_code | constant
    update_interval: int = 50
    eta: float = 1.0
    smoothing: float = 1e-4
    eval_sequences_per_domain: int = 16
    write_reference: bool = False  # evaluate: store the losses as the manifest's references
    seed: int = 1234
    num_workers: int = 0  # DataLoader processes that fetch samples (picks stay in the trainer)
    cache_dir: str = ""  # GPTDataset index cache; "" = {logging.dir}/index_cache


@dataclass
class LoggingConfig:
    """Where a run writes its resolved config, event log and TensorBoard scalars."""

    dir: str = "runs/default"
    tensorboard: bool = True


@dataclass
class RunConfig:
    """Everything one ``megashear`` command needs. ``model_preset`` fills ``model``."""

    model_preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
