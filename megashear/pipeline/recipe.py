"""The recipe of ``megashear shear``: the whole job in one YAML file.

A recipe names the source, the data, the tokenizer, the target shape, the reference losses, the
pruning method, continued pre-training, distillation, the parallel layout and the output
folder (docs/pipeline.md shows one). It is read with the project's YAML machinery
(:mod:`megashear.config_io`): an unknown key or a value of the wrong type is one ``error:``
line, and every field is also a ``--section.field=value`` flag of ``megashear shear``. Paths are
as given (relative ones to the working directory). :func:`check` then refuses what the job could
not run (a missing source, no data, a method its settings do not fit), before anything is
written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from megashear.config import UpdateRule
from megashear.config_io import ConfigError

TARGET_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                 "ffn_hidden_size")  # fmt: skip


@dataclass
class DataSection:
    """The training text: JSON Lines per domain (tokenised here), or a manifest already
    tokenised; the sequence length and the validation windows."""

    inputs: tuple[str, ...] = ()
    """JSON Lines files, one domain each (NAME.jsonl, .jsonl.gz, .jsonl.xz), or directories
    holding them; tokenised with the recipe's tokenizer. Give inputs or manifest."""
    manifest: str = ""
    """A domain manifest written by megashear preprocess (copied into the output folder, whose
    copy gets the reference losses). Give inputs or manifest."""
    max_bytes_per_domain: int | None = None
    """Read at most this much text per domain; null: all of it."""
    valid_tokens_per_domain: int | None = None
    """Tokens held out per domain for validation; null: twice the evaluation windows, at least
    4096."""
    eos_token: str | None = None
    """The document separator; null: the tokenizer's EOS."""
    add_bos: bool | None = None
    """Prepend BOS to every document; null: as the tokenizer's settings say."""
    workers: int | None = None
    """Tokenizer processes; null: one per CPU."""
    seq_length: int = 2048
    """Tokens per training and validation sequence."""
    eval_sequences: int = 16
    """Validation windows per domain (every evaluation of the job reads the same ones)."""
    update_rule: UpdateRule = "paper"
    """Dynamic batch loading's update rule (constant: fixed domain weights)."""


@dataclass
class TargetSection:
    """The target shape (pruning.target_*); a field left null keeps the source's."""

    num_layers: int | None = None
    """Transformer layers of the target."""
    hidden_size: int | None = None
    """Hidden size of the target."""
    num_attention_heads: int | None = None
    """Query heads of the target."""
    num_query_groups: int | None = None
    """KV groups of the target (GQA)."""
    ffn_hidden_size: int | None = None
    """FFN width of the target."""


@dataclass
class ReferenceSection:
    """The per-domain reference losses of dynamic batch loading."""

    method: Literal["source", "fit"] = "source"
    """source: the source model's own validation losses; fit: a scaling-law fit evaluated at
    the target's size (megashear fit-reference)."""
    points: str = ""
    """method fit: a JSON file {domain: [[parameters, loss], ...]} of three or more source
    models."""


@dataclass
class Layout:
    """A parallel layout: ranks = tp × pp × dp (one node, torchrun)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size."""

    @property
    def nproc(self) -> int:
        """The ranks of the layout."""
        return self.tp * self.pp * self.dp


@dataclass
class PruningSection:
    """How the source is cut to the target: learned masks (prune), or one shot (importance,
    leading)."""

    method: Literal["prune", "importance", "leading"] = "importance"
    """prune: hard-concrete masks and a Lagrangian for `steps` steps, then finalize;
    importance: the Minitron importance cut (no training); leading: the leading units."""
    init: Literal["paper", "importance"] = "importance"
    """method prune: the masks' start, the paper's N(5, 0.01) or the importance cut."""
    steps: int = 0
    """method prune: pruning steps (required, at least 1)."""
    batch: int = 8
    """method prune: global batch (sequences)."""
    micro_batch: int = 2
    """method prune: micro-batch per rank (sequences)."""
    lr: float = 1e-4
    """method prune: learning rate of the model weights (constant)."""
    mask_lr: float = 1.0
    """method prune: learning rate of log alpha and lambda (the paper: 1.0)."""
    domain_updates: int = 2
    """method prune: domain-weight updates of dynamic batch loading over the run."""
    pin_hidden: float = 0.0
    """method prune: pin hidden channels whose importance is this many times the median (0:
    none; pruning.pin_hidden)."""
    importance_samples: int = 64
    """Calibration windows of activation importance (method importance, init importance, or
    pin_hidden above 0)."""
    save_interval: int | None = None
    """method prune: checkpoint every this many steps (a relaunch resumes from the last);
    null: at the end only."""
    layout: Layout | None = None
    """method prune: the layout of pruning, e.g. {pp: 2}; null: the recipe's layout."""


@dataclass
class ContinuationSection:
    """Continued pre-training of the cut model, with dynamic batch loading."""

    steps: int = 0
    """Training steps (0: none; the cut model is exported)."""
    batch: int = 8
    """Global batch (sequences)."""
    micro_batch: int = 4
    """Micro-batch per rank (sequences)."""
    lr: float = 3e-4
    """Peak learning rate (cosine to lr / 10 after a 10% warm-up)."""
    domain_updates: int = 2
    """Domain-weight updates of dynamic batch loading over the run."""
    save_interval: int | None = None
    """Checkpoint every this many steps (a relaunch resumes from the last); null: at the end
    only."""
    layout: Layout | None = None
    """The layout of continued pre-training; null: the recipe's layout."""


@dataclass
class DistillSection:
    """Distillation from the source (the teacher) during continued pre-training."""

    alpha: float = 0.0
    """Weight of the KD loss (1: KD alone, 0: the LM loss alone, no teacher)."""


@dataclass
class Recipe:
    """``megashear shear``: the whole job, from the source to the Hugging Face export."""

    source: str = ""
    """The model to shear: a Hugging Face directory (config.json) or a megashear checkpoint.
    Required."""
    tokenizer: str = ""
    """The tokenizer (a tokenizer.json, a sentencepiece .model, or a directory); "": the
    source's, when the source is a Hugging Face directory."""
    output: str = ""
    """The job's folder: checkpoints, data, logs, stage records, the export (hf/). Required."""
    threads: int | None = None
    """CPU threads the job's processes share (split between the ranks of a stage); null: all
    CPUs."""
    data: DataSection = field(default_factory=DataSection)
    target: TargetSection = field(default_factory=TargetSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    continuation: ContinuationSection = field(default_factory=ContinuationSection)
    distill: DistillSection = field(default_factory=DistillSection)
    layout: Layout = field(default_factory=Layout)
    """The layout of importance, evaluation, pruning and continued pre-training (a section's
    own layout wins)."""

    def target_fields(self) -> dict[str, int]:
        """The target's given fields, ``{num_layers: 24, ...}``."""
        return {
            k: getattr(self.target, k) for k in TARGET_FIELDS if getattr(self.target, k) is not None
        }

    def prune_layout(self) -> Layout:
        """The layout of pruning."""
        return self.pruning.layout or self.layout

    def continue_layout(self) -> Layout:
        """The layout of continued pre-training."""
        return self.continuation.layout or self.layout

    def needs_importance(self) -> bool:
        """Whether the job scores activation importance."""
        p = self.pruning
        if p.method == "importance":
            return True
        return p.method == "prune" and (p.init == "importance" or p.pin_hidden > 0)

    def source_is_hf(self) -> bool:
        """Whether the source is a Hugging Face directory (else a megashear checkpoint)."""
        return os.path.isfile(os.path.join(self.source, "config.json"))

    def tokenizer_path(self) -> str:
        """The tokenizer the data is tokenised with and the export ships ("": none)."""
        if self.tokenizer:
            return self.tokenizer
        return self.source if self.source_is_hf() else ""


def _positive(value: float | None, key: str, zero: bool = False) -> None:
    ok = value is not None and math.isfinite(value) and (value >= 0 if zero else value > 0)
    if not ok:
        bound = "0 or more" if zero else "above 0"
        raise ConfigError(f"recipe key '{key}': must be {bound}, got {value}")


def check(recipe: Recipe) -> None:
    """Raise :class:`ConfigError` (one line) for the first thing the job could not run."""
    from megashear.checkpoint.format import META, TRACKER

    r = recipe
    if not r.source:
        raise ConfigError("recipe key 'source' is required (a Hugging Face directory or a "
                          "megashear checkpoint)")  # fmt: skip
    if not os.path.isdir(r.source):
        raise ConfigError(f"recipe key 'source': {r.source} is not a directory")
    is_ckpt = any(os.path.exists(os.path.join(r.source, f)) for f in (TRACKER, META))
    if not r.source_is_hf() and not is_ckpt:
        raise ConfigError(
            f"recipe key 'source': {r.source} is neither a Hugging Face directory (config.json) "
            "nor a megashear checkpoint"
        )
    if not r.output:
        raise ConfigError("recipe key 'output' is required (the job's folder)")
    if os.path.exists(r.output) and not os.path.isdir(r.output):
        raise ConfigError(f"recipe key 'output': {r.output} exists and is not a directory")
    d = r.data
    if bool(d.inputs) == bool(d.manifest):
        raise ConfigError("recipe: give data.inputs (JSON Lines per domain) or data.manifest, "
                          "one of them")  # fmt: skip
    for path in d.inputs:
        if not os.path.exists(path):
            raise ConfigError(f"recipe key 'data.inputs': {path} does not exist")
    if d.manifest and not os.path.isfile(d.manifest):
        raise ConfigError(f"recipe key 'data.manifest': {d.manifest} does not exist")
    if d.inputs and not r.tokenizer_path():
        raise ConfigError("recipe key 'tokenizer' is required to tokenise data.inputs when the "
                          "source is a megashear checkpoint")  # fmt: skip
    if r.tokenizer and not os.path.exists(r.tokenizer):
        raise ConfigError(f"recipe key 'tokenizer': {r.tokenizer} does not exist")
    for key in ("seq_length", "eval_sequences"):
        _positive(getattr(d, key), f"data.{key}")
    if not r.target_fields():
        raise ConfigError("recipe: no target: set target.num_layers ... target.ffn_hidden_size")
    for key, value in r.target_fields().items():
        _positive(value, f"target.{key}")
    if r.reference.method == "fit" and not os.path.isfile(r.reference.points):
        raise ConfigError(f"recipe key 'reference.points': reference.method fit needs a JSON "
                          f"file of losses, got {r.reference.points!r}")  # fmt: skip
    p = r.pruning
    if p.method == "prune":
        _positive(p.steps, "pruning.steps")
        for key in ("batch", "micro_batch", "lr", "mask_lr", "domain_updates"):
            _positive(getattr(p, key), f"pruning.{key}")
        _positive(p.pin_hidden, "pruning.pin_hidden", zero=True)
    if r.needs_importance():
        _positive(p.importance_samples, "pruning.importance_samples")
    c = r.continuation
    _positive(c.steps, "continuation.steps", zero=True)
    if c.steps:
        for key in ("batch", "micro_batch", "lr", "domain_updates"):
            _positive(getattr(c, key), f"continuation.{key}")
    _positive(r.distill.alpha, "distill.alpha", zero=True)
    if r.distill.alpha > 1:
        raise ConfigError(f"recipe key 'distill.alpha': must be in [0, 1], got {r.distill.alpha}")
    for key, layout in (("layout", r.layout), ("pruning.layout", p.layout),
                        ("continuation.layout", c.layout)):  # fmt: skip
        if layout is not None:
            for name in ("tp", "pp", "dp"):
                _positive(getattr(layout, name), f"{key}.{name}")
    for key, value in (("pruning.save_interval", p.save_interval),
                       ("continuation.save_interval", c.save_interval),
                       ("threads", r.threads)):  # fmt: skip
        if value is not None:
            _positive(value, key)
