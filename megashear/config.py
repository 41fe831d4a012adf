"""Run settings as dataclasses: parallel layout, training and checkpointing.

Model shapes live in :mod:`megashear.model_config`. Every field has a default that runs on a
laptop CPU; YAML files and command-line overrides fill them in.

Every field carries an attribute docstring (a string literal right after it, one or two lines:
what it is, its unit, its megatron / Sheared-LLaMA name); :mod:`megashear.config_io` reads them
for ``megashear <command> --help``. Fields with a fixed set of values are ``Literal[...]``
annotations, which ``config_io`` checks for YAML values and flags alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megashear.model_config import ModelConfig

# The choices of the Literal fields. Each mirrors what the code consuming it accepts
# (tests/test_config_io.py checks that they agree):
# - megashear.data.update_rules.RULES;
UpdateRule = Literal["paper", "reference_code", "constant"]
# - megatron.core.optimizer_param_scheduler.OptimizerParamScheduler, as the trainer builds it
#   ("WSD" also needs wsd_decay_steps, which the trainer does not pass, so it is not offered);
LrDecayStyle = Literal["constant", "linear", "cosine", "inverse-square-root"]
# - megashear.pruning.hard_concrete.ALL_KINDS.
MaskKind = Literal["hidden", "head", "head_layer", "intermediate", "mlp", "layer"]


@dataclass
class ParallelConfig:
    """Parallel layout. The data-parallel size is derived: world size / (tp * pp)."""

    tp: int = 1
    """Tensor-parallel size (megatron --tensor-model-parallel-size); must divide the heads,
    query groups and FFN width."""
    pp: int = 1
    """Pipeline-parallel size (megatron --pipeline-model-parallel-size); the layers are split
    into pp stages."""
    vpp: int | None = None
    """Virtual pipeline chunks per pipeline rank for the interleaved schedule (megatron-core
    virtual_pipeline_model_parallel_size); null: none. Needs pp >= 2; not for pruning."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (--sequence-parallel): the [s, b, h] activations between
    attention and MLP (norms, residual stream, the masks on them) are split over the sequence
    on each TP rank; needs tp >= 2."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (megatron
    --use-distributed-optimizer)."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (megatron --recompute-granularity): none; selective recomputes
    core attention in the backward; full recomputes whole layers from their inputs."""
    recompute_method: Literal["uniform", "block"] | None = None
    """With full recomputation (megatron --recompute-method): uniform keeps the input of every
    group of recompute_num_layers layers; block recomputes the first recompute_num_layers
    layers of each pipeline stage. null with none or selective."""
    recompute_num_layers: int | None = None
    """With full recomputation (megatron --recompute-num-layers): layers per group (uniform) or
    recomputed per stage (block); null with none or selective."""


@dataclass
class TrainConfig:
    """Optimisation settings (megatron names where they exist)."""

    micro_batch_size: int = 2
    """Sequences per forward/backward pass on one data-parallel rank (megatron
    --micro-batch-size)."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks (megatron --global-batch-size); a multiple
    of dp * micro_batch_size."""
    train_iters: int = 20
    """Optimizer steps the run ends at, counted from 0, also when resuming (megatron
    --train-iters; Sheared-LLaMA pruning: 3200)."""
    lr: float = 3e-4
    """Peak learning rate of the model weights (megatron --lr; Sheared-LLaMA 1e-4)."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay (megatron --min-lr)."""
    lr_warmup_iters: int = 2
    """Steps of linear warm-up from 0 to lr (megatron --lr-warmup-iters)."""
    lr_decay_style: LrDecayStyle = "cosine"
    """Decay from lr to min_lr over train_iters (megatron --lr-decay-style)."""
    weight_decay: float = 0.1
    """Decoupled AdamW weight decay (megatron --weight-decay; Sheared-LLaMA pruning: 0)."""
    adam_beta1: float = 0.9
    """Adam beta1 (megatron --adam-beta1)."""
    adam_beta2: float = 0.95
    """Adam beta2 (megatron --adam-beta2)."""
    adam_eps: float = 1e-8
    """Adam epsilon (megatron --adam-eps)."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (megatron --clip-grad)."""
    seed: int = 1234
    """Seed of the weight initialisation and megatron's RNG tracker (megatron --seed)."""
    bf16: bool | None = None
    """bf16 weights and compute (megatron --bf16); null: bf16 on GPU, fp32 on CPU."""
    log_interval: int = 1
    """Print a loss / lr / grad-norm / tokens-per-s line every this many steps (megatron
    --log-interval)."""
    signal_exit_code: int = 0
    """Exit code after SIGTERM / SIGINT stopped the run at a step boundary and its checkpoint
    was saved: 0, as megatron's --exit-signal-handler (the job ended cleanly; the same command
    resumes), or e.g. 143 (128 + SIGTERM) for a scheduler that requeues failed jobs."""


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint."""

    save: str | None = None
    """Checkpoint root directory to save into (megatron --save); null: save nothing."""
    load: str | None = None
    """Checkpoint to start from: a root (its latest iteration) or an iter_N directory (megatron
    --load); its model shape becomes model.*."""
    init: str | None = None
    """Initial weights (a converted or finalised model) of a run that may be relaunched: used,
    weights only, while checkpoint.save holds no checkpoint; after that the run resumes from
    checkpoint.save. Needs checkpoint.save; excludes checkpoint.load."""
    save_interval: int | None = None
    """Also save every this many steps (megatron --save-interval); null: only at the end."""
    keep_last: int = 2
    """Iterations kept under checkpoint.save; older ones are deleted (0: keep all)."""


@dataclass
class PruningConfig:
    """Targeted structured pruning (docs/method.md §2-3).

    ``target`` is a preset name (``sheared-llama-1.3b``, ...) or empty when the target shape is
    given by the ``target_*`` fields.
    """

    target: str = ""
    """Target shape preset: sheared-llama-2.7b, sheared-llama-1.3b or sheared-llama-370m
    (megashear.pruning.targets); "": the target_* fields alone."""
    target_num_layers: int | None = None
    """Target transformer layers (Sheared-LLaMA target_model.n_layers); null: the preset's or
    the source's."""
    target_hidden_size: int | None = None
    """Target model width (Sheared-LLaMA target_model.d_model); null: the preset's or the
    source's."""
    target_num_attention_heads: int | None = None
    """Target query heads (Sheared-LLaMA target_model.n_heads); null: the preset's or the
    source's."""
    target_num_query_groups: int | None = None
    """Target key/value groups (GQA); null: keep the source's query heads per group (MHA: one
    per head)."""
    target_ffn_hidden_size: int | None = None
    """Target SwiGLU width (Sheared-LLaMA target_model.intermediate_size); null: the preset's
    or the source's."""
    kinds: tuple[MaskKind, ...] = ("head", "intermediate", "layer", "hidden")
    """Mask kinds to learn (Sheared-LLaMA l0_module.pruning_modules); the paper prunes head,
    intermediate, layer, hidden."""
    lagrangian_warmup_steps: int = 640
    """Steps over which the target sparsity ramps linearly from 0 (Sheared-LLaMA
    lagrangian_warmup_steps; the reference uses 640 of 3200)."""
    lr_log_alpha: float = 1.0
    """Peak learning rate of the masks' log alpha, on train's schedule (Sheared-LLaMA lag_lr,
    1.0)."""
    lr_lambda: float = 1.0
    """Learning rate of the Lagrange multipliers, gradient ascent (Sheared-LLaMA lag_lr, 1.0)."""
    log_alpha_init_mean: float = 5.0
    """Mean of the N(mean, 0.01) initial log alpha of every mask entry (Sheared-LLaMA: 5)."""
    seed: int = 17
    """Seed of the masks' hard-concrete sampling noise, the same at every layout (Sheared-LLaMA
    global_seed 17)."""
    init: Literal["paper", "importance"] = "paper"
    """Initial log alpha (docs/method.md §8): paper draws N(log_alpha_init_mean, 0.01) for every
    unit; importance starts the units the importance cut keeps at ln 100 and the others where
    each kind's expected sparsity is 0.001 below its target (scores from megashear importance,
    see importance.path), with no warm-up, and clamps log alpha to [ln 1e-4, ln 100] instead of
    the paper's [ln 0.01, ln 100]."""
    pin_hidden: float = 0.0
    """Keep hidden channels whose importance is at least this many times the median kept
    channel's deterministically (z = 1, never sampled; massive activations, docs/method.md §8);
    0: none. Needs importance scores."""


@dataclass
class ImportanceConfig:
    """Activation importance, the Minitron way (megashear importance; docs/method.md §8)."""

    samples: int = 64
    """Calibration sequences of model.seq_length tokens, drawn from the training data with
    data.seed (Minitron: 1024)."""
    path: str = ""
    """The scores file: written by megashear importance, read by megashear one-shot
    --method=importance and pruning.init=importance; "": importance.pt in the root of the
    source checkpoint (checkpoint.load, or checkpoint.init)."""


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher during training or pruning (docs/method.md §7).

    Off while ``teacher`` is empty. The loss per token is ``alpha * KD + (1 - alpha) * LM``,
    with KD the temperature-scaled KL(teacher || student) times ``temperature**2``.
    """

    teacher: str = ""
    """Teacher checkpoint (root or iter_N directory), typically the converted source model; it
    must share the student's vocabulary. "": no distillation."""
    alpha: float = 1.0
    """Weight of the KD loss against the LM loss: 1.0 is KD alone (Minitron's choice), 0.0 the
    LM loss alone (the KD loss is still computed and logged)."""
    temperature: float = 1.0
    """Softmax temperature of both models' logits in the KL (Hinton et al.); > 0."""
    top_k: int | None = None
    """KL against the teacher's k most likely tokens only (renormalised over them); null: the
    full vocabulary."""


@dataclass
class DataConfig:
    """Training data: a domain manifest (``tools/preprocess_data.py``), one token stream, or
    synthetic tokens."""

    manifest: str = ""
    """Domain manifest YAML from tools/preprocess_data.py; enables dynamic batch loading. "":
    token_file or synthetic."""
    token_file: str = ""
    """One pre-tokenized stream (.npy of token ids), no domains; used when manifest is ""."""
    synthetic: bool = False
    """Learnable synthetic token sequences (tests, benchmarks) when neither manifest nor
    token_file is set."""
    update_rule: UpdateRule = "paper"
    """Domain-weight update (docs/method.md §5): paper clamps the excess loss at 0, reference_code
    does not and smooths; constant keeps the weights (Sheared-LLaMA update_type)."""
    update_interval: int = 50
    """Steps between domain-weight updates (Sheared-LLaMA eval_interval: 50 for pruning, 400 for
    continued pre-training)."""
    eta: float = 1.0
    """Step size of the update: w <- normalise(w * exp(eta * excess loss))."""
    smoothing: float = 1e-4
    """reference_code only: mix the new weights with this share of uniform (reference 1e-4)."""
    eval_sequences_per_domain: int = 16
    """Validation sequences per domain (of model.seq_length tokens) for the per-domain losses."""
    eval_split: Literal["valid", "test"] = "valid"
    """evaluate: the split it reports on; test is the held-out split that neither training nor
    dynamic batch loading reads (preprocess_data.py --test-tokens-per-domain)."""
    write_reference: bool = False
    """evaluate: store the losses in the manifest as its reference losses (source reference)."""
    seed: int = 1234
    """Seed of the order in which training samples are drawn."""
    num_workers: int = 0
    """DataLoader processes that fetch samples (the picks stay in the trainer); 0: in-process."""
    cache_dir: str = ""
    """GPTDataset index cache directory; "": {logging.dir}/index_cache."""


@dataclass
class LoggingConfig:
    """Where a run writes its resolved config, event log and TensorBoard scalars."""

    dir: str = "runs/default"
    """Run directory: config.yaml, the event log and TensorBoard files."""
    tensorboard: bool = True
    """Also write TensorBoard scalars under logging.dir."""
    p2_law: str = ""
    """A fitted P² law (the JSON of megashear fit-p2 --out): megashear train then logs the law's
    predicted validation loss beside the observed one with every domain_update ("": off)."""


@dataclass
class RunConfig:
    """Everything one ``megashear`` command needs. ``model_preset`` fills ``model``."""

    model_preset: str = ""
    """Model shape preset that fills model.* (megashear.model_config.PRESETS: llama2-7b,
    llama3.1-8b, smollm2-135m, tiny-gqa, ...); "": model.* alone."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model shape (megashear.model_config.ModelConfig)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint locations and schedule."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    """Pruning target and mask settings (megashear prune)."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    """Activation importance scores (megashear importance, one-shot, pruning.init)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation from a teacher (megashear train and prune)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Run directory and TensorBoard."""


@dataclass
class OneShotConfig(RunConfig):
    """``megashear one-shot``: a run config plus the cut's method."""

    method: Literal["importance", "leading"] = "importance"
    """importance: cut the least important units by activation importance (Minitron, GQA-aware;
    scores from importance.path); leading: keep the leading units (a floor that uses no
    information)."""
    overwrite: bool = False
    """Replace an existing checkpoint.save."""
