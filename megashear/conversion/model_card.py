"""The model card (``README.md``) of a Hugging Face export: what the checkpoint records, no more.

:func:`model_card` writes, from a checkpoint's ``megashear.json``:

- the export's source (the checkpoint directory and its iteration);
- the model's shape and parameter count, beside the pre-cut shape where a record gives it
  (a one-shot cut's ``source_model``);
- the recipe as far as it is recorded: a one-shot cut (method, source, importance scores),
  distillation (teacher, alpha, temperature, top-k), the optimizer steps of the checkpoint
  (its ``iteration``), and any other record, shown as stored;
- the per-domain validation losses, when given, beside the source's;
- the ``megashear`` command line of the export.

Whatever the checkpoint does not record is said to be unrecorded rather than guessed (a model
finalised by ``megashear finalize`` records no pruning history, for one). This module only
formats: it reads no tensors and knows nothing of how pruning works.
"""

from __future__ import annotations

import json
import math
import os

from megashear.model_config import ModelConfig

# megashear.json keys that describe the checkpoint itself; every other key is a record of how
# the model was made (``one_shot``, ``distill``, ...), which a rewrite of the same weights
# (reshard) carries over. ``pruning`` marks a masked model and is never carried.
OWN_KEYS = ("model", "layout", "iteration", "contents", "dtype", "optimizer", "pruning")

# (ModelConfig field, the card's label)
SHAPE_ROWS = (
    ("num_layers", "layers"),
    ("hidden_size", "hidden size"),
    ("num_attention_heads", "attention heads"),
    ("num_query_groups", "key/value heads"),
    ("head_dim", "head dimension"),
    ("ffn_hidden_size", "FFN width"),
    ("vocab_size", "vocabulary"),
    ("seq_length", "context length"),
)


def provenance(meta: dict) -> dict:
    """The records of ``meta`` (a ``megashear.json``) that say how the model was made."""
    return {k: v for k, v in meta.items() if k not in OWN_KEYS}


def read_losses(path: str, name: str) -> dict[str, float]:
    """Per-domain losses from the JSON object in ``path`` (``{domain: loss}``); a
    ``ValueError`` naming ``name`` (the setting that gave the path) when the file is missing,
    is not such an object, or holds a loss that is not a finite number."""
    if not os.path.isfile(path):
        raise ValueError(f"{name} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{name} {path} must hold a JSON object {{domain: loss}}")
    out = {}
    for domain, value in data.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise ValueError(f"{name} {path}: the loss of {domain!r} is not a number: {value!r}")
        out[str(domain)] = float(value)
    return out


def _count(n: int) -> str:
    """A parameter count with its exact value: ``1.24B (1,235,814,400)``."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _model(data) -> ModelConfig | None:
    """A recorded model shape, or None if the record holds none it can read."""
    if not isinstance(data, dict):
        return None
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError):
        return None


def _shape_table(model: ModelConfig, source: ModelConfig | None) -> list[str]:
    head = "| | this model |" + (" source |" if source else "")
    rule = "|---|---:|" + ("---:|" if source else "")
    rows = [head, rule]
    for name, label in SHAPE_ROWS:
        row = f"| {label} | {getattr(model, name)} |"
        if source:
            row += f" {getattr(source, name)} |"
        rows.append(row)
    row = f"| parameters | {_count(model.num_parameters())} |"
    if source:
        row += f" {_count(source.num_parameters())} |"
    rows.append(row)
    extras = [
        f"tied embeddings: {'yes' if model.tie_word_embeddings else 'no'}",
        f"RoPE base {model.rotary_base:g}",
        f"RMSNorm epsilon {model.norm_epsilon:g}",
    ]
    if model.rope_scaling != "none":
        extras.append(f"{model.rope_scaling} RoPE scaling, factor {model.rope_scaling_factor:g}")
    return [*rows, "", "; ".join(extras) + "."]


def _recipe(meta: dict) -> tuple[list[str], ModelConfig | None]:
    """The recipe lines of ``meta``'s records and the pre-pruning shape, if recorded."""
    lines: list[str] = []
    source = None
    one_shot = meta.get("one_shot")
    if isinstance(one_shot, dict):
        method = one_shot.get("method", "unrecorded")
        line = f"- **One-shot cut** (no training), method `{method}`"
        if one_shot.get("source"):
            line += f", of `{one_shot['source']}`"
        if one_shot.get("importance"):
            line += f", by the activation importance scores in `{one_shot['importance']}`"
        lines.append(line + ".")
        source = _model(one_shot.get("source_model"))
    distill = meta.get("distill")
    if isinstance(distill, dict):
        line = f"- **Knowledge distillation** from `{distill.get('teacher', 'unrecorded')}`"
        settings = [f"{k} {distill[k]}" for k in ("alpha", "temperature", "top_k") if k in distill]
        if settings:
            line += f" ({', '.join(settings)})"
        lines.append(line + ".")
    known = ("one_shot", "distill")
    for key, record in provenance(meta).items():
        if key not in known:  # a record this card does not know how to word: shown as stored
            lines.append(f"- `{key}`: `{json.dumps(record, sort_keys=True)}`")
    iteration = meta.get("iteration")
    if isinstance(iteration, int) and iteration > 0:
        lines.append(f"- **Training**: this checkpoint is step {iteration} of its run.")
    if not lines:
        lines.append(
            "- megashear.json records no one-shot cut, distillation or training steps for this "
            "checkpoint: a converted model, or one finalised from a pruning run (a finalised "
            "checkpoint does not record the pruning run)."
        )
    lines.append("- Tokens seen: not recorded in megashear.json.")
    return lines, source


def _loss_table(losses: dict[str, float], source: dict[str, float] | None) -> list[str]:
    domains = list(losses) + [d for d in (source or {}) if d not in losses]
    if source:
        rows = ["| domain | this model | source | difference |", "|---|---:|---:|---:|"]
    else:
        rows = ["| domain | this model |", "|---|---:|"]
    for d in domains:
        ours = f"{losses[d]:.4f}" if d in losses else "n/a"
        if source:
            theirs = f"{source[d]:.4f}" if d in source else "n/a"
            diff = f"{losses[d] - source[d]:+.4f}" if d in losses and d in source else "n/a"
            rows.append(f"| {d} | {ours} | {theirs} | {diff} |")
        else:
            rows.append(f"| {d} | {ours} |")
    return rows


def model_card(
    meta: dict,
    checkpoint: str,
    command: str,
    name: str,
    losses: dict[str, float] | None = None,
    source_losses: dict[str, float] | None = None,
    tokenizer: str | None = None,
) -> str:
    """The ``README.md`` of an HF export of the checkpoint ``checkpoint`` (its ``meta``).

    Args:
        command: the ``megashear`` command line that makes the export.
        name: the model's name, the card's title (the export directory's name).
        losses: per-domain validation losses of this model (none: no loss section).
        source_losses: the source model's, on the same data, shown beside them.
        tokenizer: the tokenizer shipped with the export, if any.
    """
    model = ModelConfig.from_dict(meta["model"])
    recipe, source = _recipe(meta)
    pruned = source is not None
    tags = ["llama", "megashear", *(["pruned"] if pruned else [])]
    out = [
        "---",
        "library_name: transformers",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
        "",
        f"# {name}",
        "",
        f"A LLaMA model exported by megashear from the checkpoint `{os.path.abspath(checkpoint)}`"
        + (f" (iteration {meta['iteration']})" if isinstance(meta.get("iteration"), int) else "")
        + ".",
        "Everything below is read from that checkpoint's `megashear.json`; what it does not "
        "record is marked so.",
        "",
        "## Shape",
        "",
        *_shape_table(model, source),
        "",
        "## How it was made",
        "",
        *recipe,
    ]
    if losses:
        out += [
            "",
            "## Validation loss per domain",
            "",
            "Mean next-token cross-entropy (nats) on each domain's held-out tokens, as given to "
            "the export.",
            "",
            *_loss_table(losses, source_losses),
        ]
    out += [
        "",
        "## Files",
        "",
        "`config.json`, `generation_config.json` and safetensors weights"
        + (f"; the tokenizer from `{tokenizer}`." if tokenizer else "; no tokenizer was shipped."),
        "",
        "## Made with",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(out)
