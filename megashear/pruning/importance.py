"""Activation importance, the Minitron way: per-sample statistics, scores, the one-shot cut they
define, and the log α they initialise (docs/method.md §8).

Minitron (Muralidharan et al. 2024, arXiv 2407.14679; Sreenivas et al. 2024, 2408.11796) ranks
structured units by the activations a small calibration set produces, with no gradient.
Full (unsharded) score layouts, larger is more important:

================  ==========  ==============================================================
kind              shape       statistic of one calibration sequence (``s`` tokens)
================  ==========  ==============================================================
``head``          ``[L, a]``  input of ``linear_proj`` ``[s, b, a*hn]``: L2 over the head dim,
                              then mean over the sequence
``intermediate``  ``[L, f]``  input of ``linear_fc2`` ``[s, b, f]``: mean of ``|x|`` over the
                              sequence
``hidden``        ``[h]``     output of each RMSNorm ``[s, b, h]``: mean of ``|x|`` over the
                              sequence, one vector per norm (two per layer and the final norm)
``layer``         ``[L]``     block importance: ``1 - cos(layer input, layer output)`` per token
================  ==========  ==============================================================

Aggregation over samples is Minitron's best one: the per-sequence mean, then the L2 norm over
the samples (``sqrt`` of the sum of squares). ``hidden`` is that L2 per norm, summed over every
norm of the model (all layers, all pipeline stages). ``layer`` is the mean over all tokens of
all samples. Summing squares per sample and reducing them with ``sqrt`` at the end makes the
scores independent of how the samples are split over data-parallel ranks and micro-batches.

:func:`finish` turns the full sums of a calibration pass
(:mod:`megashear.training.importance_pass`) into scores. :func:`importance_masks` cuts at a target (GQA-aware, see
:func:`~megashear.pruning.hard_concrete.select_grouped_heads`), :func:`importance_log_alpha`
maps the cut to initial ``log α``. :func:`save_scores` / :func:`load_scores` are the file.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from megashear.atomic_file import atomic_path
from megashear.model_config import ModelConfig
from megashear.pruning import hard_concrete as hc
from megashear.pruning.targets import validate_target

logger = logging.getLogger(__name__)

SCORE_KINDS = ("hidden", "head", "intermediate", "layer")
FORMAT = "megashear-importance/1"
FILE_NAME = "importance.pt"

# log α of units the importance cut keeps (docs/method.md §8): the clamp's top, where the paper's
# N(5, 0.01) lands after clamping. The dropped units start where each kind's expected sparsity
# is INIT_MARGIN below its target (importance_log_alpha), inside the importance clamp. The margin
# gives the Lagrangian's first steps a sign that float32 rounding cannot flip (λ follows Adam,
# which would turn a zero-mean rounding difference into full-size steps of either sign).
KEEP_LOG_ALPHA = hc.LOG_ALPHA_MAX
INIT_MARGIN = 1e-3


def head_statistic(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[s, b, n*hn]`` -> ``[b, n]``: L2 over each head's ``hn`` channels, mean over ``s``."""
    s, b, width = x.shape
    return x.detach().float().view(s, b, width // head_dim, head_dim).norm(dim=-1).mean(0)


def channel_statistic(x: torch.Tensor) -> torch.Tensor:
    """``[s, b, n]`` -> ``[b, n]``: mean of ``|x|`` over ``s``."""
    return x.detach().float().abs().mean(0)


def block_statistic(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """``[s, b, h]`` twice -> ``[]``: the sum over tokens of ``1 - cos(x_in, x_out)``."""
    cos = torch.nn.functional.cosine_similarity(x_in.detach().float(), x_out.detach().float(), -1)
    return (1 - cos).sum()


def finish(
    head: torch.Tensor,
    intermediate: torch.Tensor,
    hidden: torch.Tensor,
    layer: torch.Tensor,
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Scores (float32) from full sums of squares ``head [L, a]`` and ``intermediate
    [L, f]``, the per-norm L2 norms summed over every norm of the model ``hidden [h]``, and the
    block-importance sums ``layer`` over ``tokens [L]``."""
    return {
        "hidden": hidden.float(),
        "head": head.sqrt().float(),
        "intermediate": intermediate.sqrt().float(),
        "layer": (layer / tokens.clamp(min=1)).float(),
    }


def check_scores(scores: dict[str, torch.Tensor], source: ModelConfig) -> None:
    """Raise a one-line ``ValueError`` unless ``scores`` has every kind in ``source``'s full
    layout, with finite values."""
    shapes = {
        "hidden": (source.hidden_size,),
        "head": (source.num_layers, source.num_attention_heads),
        "intermediate": (source.num_layers, source.ffn_hidden_size),
        "layer": (source.num_layers,),
    }
    for kind, shape in shapes.items():
        if kind not in scores:
            raise ValueError(f"importance scores lack the {kind!r} scores")
        got = tuple(scores[kind].shape)
        if got != shape:
            raise ValueError(
                f"importance scores of {kind!r} have shape {list(got)}, the model needs "
                f"{list(shape)} (scores of another model?)"
            )
        if not torch.isfinite(scores[kind]).all():
            raise ValueError(f"importance scores of {kind!r} are not all finite")


def _top(score: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 float mask of the ``keep`` largest entries of the last dim of ``score``."""
    mask = torch.zeros_like(score, dtype=torch.float32)
    idx = torch.topk(score.float(), k=keep, dim=-1).indices
    return mask.scatter_(-1, idx, 1.0)


def importance_masks(
    scores: dict[str, torch.Tensor],
    source: ModelConfig,
    target: ModelConfig,
    kinds: tuple[str, ...] = SCORE_KINDS,
) -> dict[str, torch.Tensor]:
    """0/1 masks (float32, full layouts of :mod:`.hard_concrete`) of the importance cut.

    - ``hidden``: the ``h'`` best channels; ``layer`` (and ``head_layer`` / ``mlp``, which keep
      the same layers): the ``L'`` layers of highest block importance;
    - ``intermediate``: per layer, its ``f'`` best units;
    - ``head``: per layer, the ``r' = a'/g'`` best heads of each group, and the ``g'`` groups
      whose kept heads score highest in sum, so every kept group keeps ``r'`` heads and the
      result is a standard GQA LLaMA (with MHA, simply the ``a'`` best heads).

    Every survivor is exactly 1, so :func:`~megashear.pruning.finalize.finalize` slices the
    source weights without rescaling.

    Raises:
        ValueError: ``target`` cannot be cut from ``source``, or the scores do not fit it.
    """
    validate_target(source, target)
    check_scores(scores, source)
    masks = {}
    for kind in kinds:
        if kind == "hidden":
            masks[kind] = _top(scores["hidden"], target.hidden_size)
        elif kind in hc.LAYER_KINDS:
            masks[kind] = _top(scores["layer"], target.num_layers)
        elif kind == "intermediate":
            masks[kind] = _top(scores["intermediate"], target.ffn_hidden_size)
        elif kind == "head":
            g_t = target.num_query_groups
            keep = hc.select_grouped_heads(
                scores["head"].float(),
                source.num_query_groups,
                g_t,
                target.num_attention_heads // g_t,
            )
            masks[kind] = keep.float()
        else:
            raise ValueError(f"unknown mask kind {kind!r}; allowed: {list(hc.ALL_KINDS)}")
    return masks


def importance_log_alpha(
    scores: dict[str, torch.Tensor],
    source: ModelConfig,
    target: ModelConfig,
    kinds: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """Initial full ``log α`` per kind (docs/method.md §8): ``ln 100`` where the importance
    cut keeps the unit; elsewhere the value at which the kind's expected sparsity is
    :data:`INIT_MARGIN` below its target, per row for ``head [L, a]`` and ``intermediate [L, f]``.

    With ``k`` kept and ``d`` dropped entries in a row (``n = k + d``, target ``d / n``), the
    dropped ones get ``P(z ≠ 0) = (k · (1 - P_keep) + δ · n) / d`` (``P_keep`` the kept units'
    0.998, ``δ`` the margin), so that ``1 - (k · P_keep + d · P(z ≠ 0)) / n = d / n - δ``; the
    value is held inside [ln 1e-4, ln 100], the importance clamp
    (:func:`~.hard_concrete.log_alpha_floor`).
    Every kept value exceeds every dropped one, so the deterministic masks at the target select
    exactly the importance cut."""
    floor = hc.IMPORTANCE_LOG_ALPHA_MIN
    p_keep = float(hc.keep_probability(torch.tensor(KEEP_LOG_ALPHA), floor))
    out = {}
    for kind, mask in importance_masks(scores, source, target, kinds).items():
        kept = mask > 0
        k = kept.sum(-1, keepdim=True).double()  # [L, 1] or [1]
        d = (~kept).sum(-1, keepdim=True).double()
        n = k + d
        # capped at 0.5 (log α 1.6 < ln 100): a row that drops very few units stays ranked
        p_drop = ((k * (1 - p_keep) + INIT_MARGIN * n) / d.clamp(min=1)).clamp(max=0.5)
        drop = hc.log_alpha_for_keep_probability(p_drop).clamp(floor, KEEP_LOG_ALPHA)
        out[kind] = torch.where(kept, KEEP_LOG_ALPHA, drop).float()
    return out


def pinned_hidden(scores: dict[str, torch.Tensor], target: ModelConfig, factor: float) -> list[int]:
    """Hidden channels whose score is at least ``factor`` times the median score of the
    channels the importance cut keeps (SmolLM2's massive-activation channels): these are kept
    deterministically, never sampled (docs/method.md §8). ``factor <= 0``: none."""
    if factor <= 0:
        return []
    hidden = scores["hidden"].float()
    kept = torch.topk(hidden, k=target.hidden_size).values
    threshold = factor * float(kept.median())
    return sorted(int(i) for i in torch.nonzero(hidden >= threshold).flatten())


# ---------------------------------------------------------------- the file


def default_path(checkpoint: str) -> str:
    """Where ``megashear importance`` writes the scores of ``checkpoint`` by default: beside
    its iterations, in the checkpoint root (an ``iter_N`` directory: its parent)."""
    from megashear.checkpoint.format import META

    root = checkpoint.rstrip(os.sep)
    if os.path.isfile(os.path.join(root, META)):  # an iter_N directory (or a bare one)
        parent = os.path.dirname(root)
        root = parent if os.path.basename(root).startswith("iter_") else root
    return os.path.join(root, FILE_NAME)


def save_scores(path: str, scores: dict[str, torch.Tensor], record: dict) -> None:
    """Write scores and ``record`` (model, checkpoint, fingerprint, samples) through a
    temporary name and a rename."""
    payload = {"format": FORMAT, **record, "scores": {k: v.cpu() for k, v in scores.items()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_scores(path: str, source: ModelConfig, fingerprint: str | None = None) -> dict:
    """The record of a scores file, checked against ``source`` (and its checkpoint's
    ``fingerprint`` when given); one-line ``ValueError`` otherwise. ``record["scores"]`` holds
    the scores."""
    if not os.path.isfile(path):
        raise ValueError(f"importance scores {path} do not exist (run megashear importance)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any damage is one line
        raise ValueError(f"{path} is not an importance file ({str(exc).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not an importance file (format {FORMAT} expected)")
    saved = record.get("model", {})
    for field in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups"):
        if saved.get(field, getattr(source, field)) != getattr(source, field):
            raise ValueError(
                f"{path} scores another model ({field} {saved.get(field)}, this model has "
                f"{getattr(source, field)})"
            )
    if fingerprint and record.get("fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"{path} scores another checkpoint ({record.get('checkpoint')}, fingerprint "
            f"{record.get('fingerprint')} != {fingerprint})"
        )
    check_scores(record["scores"], source)
    return record


def summary(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """A few numbers that describe the scores (for logs and the command's JSON)."""
    hidden = scores["hidden"].float()
    med = float(hidden.median())
    return {
        "hidden_max_over_median": float(hidden.max()) / med if med > 0 else math.inf,
        "hidden_argmax": int(hidden.argmax()),
        "layer_min": float(scores["layer"].min()),
        "layer_max": float(scores["layer"].max()),
    }
