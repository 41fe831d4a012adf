"""Target shapes for pruning: presets, validation and per-kind target sparsities.

A target is a :class:`~megashear.model_config.ModelConfig` with the source's vocabulary, rotary
base, norm epsilon and head dimension ``hn`` (heads are pruned whole; the per-head width never
changes). Its ``kv_channels`` is set to the source ``hn`` only when ``hidden / heads`` differs.

Design decision, heads vs hidden: the target's ``hidden`` and ``heads × hn`` are independent.
Pruning ``hidden`` only narrows the input dim of ``q/k/v`` and the output dim of ``o``, so any
combination is a valid model (megatron-core's ``kv_channels``, HF's ``head_dim``). The presets
satisfy ``heads = hidden / hn`` as in Sheared-LLaMA; ``validate_target(strict_head_dim=True)``
enforces it for tools that assume ``head_dim = hidden / heads``.

GQA: target groups ``g'`` must divide target heads ``a'``, with ``g' ≤ g`` and
``a'/g' ≤ a/g`` (a group keeps a subset of its own query heads). When a preset is applied to a
GQA source without an explicit group count, the source's heads-per-group ratio is kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

TARGET_PRESETS: dict[str, dict[str, int]] = {
    "sheared-llama-2.7b": dict(
        num_layers=32, hidden_size=2560, num_attention_heads=20, ffn_hidden_size=6912
    ),
    "sheared-llama-1.3b": dict(
        num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5504
    ),
    "sheared-llama-370m": dict(
        num_layers=24, hidden_size=1024, num_attention_heads=8, ffn_hidden_size=2816
    ),
}

# The shape fields a target may set (make_target's keywords; tools spell them --target-FIELD).
TARGET_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
)


def make_target(
    source: ModelConfig,
    preset: str = "",
    *,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    ffn_hidden_size: int | None = None,
) -> ModelConfig:
    """The target ModelConfig from a preset name and/or explicit fields (fields win).

    Unset fields fall back to the preset, then to the source. Vocabulary, head dim, rotary base,
    norm epsilon and sequence length are inherited from the source.
    """
    if preset and preset not in TARGET_PRESETS:
        raise ValueError(f"unknown target preset {preset!r}; allowed: {sorted(TARGET_PRESETS)}")
    base = dict(TARGET_PRESETS[preset]) if preset else {}
    given = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
    )
    base.update({k: v for k, v in given.items() if v is not None})
    fields = {
        k: base.get(k, getattr(source, k))
        for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")
    }
    heads = fields["num_attention_heads"]
    if num_query_groups is None:
        if not source.is_gqa:
            num_query_groups = heads
        else:
            ratio = source.num_attention_heads // source.num_query_groups
            if heads % ratio:
                raise ValueError(
                    f"target heads {heads} not divisible by the source's {ratio} heads per group;"
                    " give num_query_groups explicitly"
                )
            num_query_groups = heads // ratio
    hn = source.head_dim
    kv = None if fields["hidden_size"] == heads * hn else hn
    return dataclasses.replace(source, num_query_groups=num_query_groups, kv_channels=kv, **fields)


def validate_target(
    source: ModelConfig,
    target: ModelConfig,
    tp_sizes: Iterable[int] = (),
    pp_sizes: Iterable[int] = (),
    strict_head_dim: bool = False,
) -> None:
    """Raise a one-line ``ValueError`` when ``target`` cannot be pruned out of ``source``.

    Args:
        source, target: the shapes.
        tp_sizes: tensor-parallel sizes the target must run with (heads, groups, FFN divisible).
        pp_sizes: pipeline sizes the target must run with (layers divisible).
        strict_head_dim: also require ``target.hidden == target.heads * head_dim``.
    """
    dims = (
        ("num_layers", "layers"),
        ("hidden_size", "hidden size"),
        ("num_attention_heads", "attention heads"),
        ("num_query_groups", "query groups"),
        ("ffn_hidden_size", "FFN size"),
    )
    for field, name in dims:
        t, s = getattr(target, field), getattr(source, field)
        if t < 1:
            raise ValueError(f"target {name} must be positive, got {t}")
        if t > s:
            raise ValueError(f"target {name} {t} is larger than the source's {s}")
    if target.vocab_size != source.vocab_size:
        raise ValueError(
            f"target vocab {target.vocab_size} differs from the source's {source.vocab_size}"
        )
    if target.head_dim != source.head_dim:
        raise ValueError(
            f"target head dim {target.head_dim} differs from the source's {source.head_dim}"
            " (set kv_channels)"
        )
    a, g = target.num_attention_heads, target.num_query_groups
    if a % g:
        raise ValueError(f"target query groups {g} do not divide target heads {a}")
    src_ratio = source.num_attention_heads // source.num_query_groups
    if a // g > src_ratio:
        raise ValueError(f"target has {a // g} heads per group, more than the source's {src_ratio}")
    if strict_head_dim and target.hidden_size != a * target.head_dim:
        raise ValueError(
            f"target hidden {target.hidden_size} != heads {a} x head dim {target.head_dim}"
        )
    for tp in tp_sizes:
        for field, name in (
            ("num_attention_heads", "heads"),
            ("num_query_groups", "query groups"),
            ("ffn_hidden_size", "FFN size"),
        ):
            if getattr(target, field) % tp:
                raise ValueError(f"target {name} {getattr(target, field)} not divisible by TP {tp}")
    for pp in pp_sizes:
        if target.num_layers % pp:
            raise ValueError(f"target layers {target.num_layers} not divisible by PP {pp}")


def target_sizes(target: ModelConfig, kinds: Iterable[str]) -> dict[str, int]:
    """Kept entries per kind at the target (per layer for ``head`` and ``intermediate``)."""
    sizes = {
        "hidden": target.hidden_size,
        "head": target.num_attention_heads,
        "intermediate": target.ffn_hidden_size,
        "layer": target.num_layers,
        "head_layer": target.num_layers,
        "mlp": target.num_layers,
    }
    return {k: sizes[k] for k in kinds}


def target_sparsities(
    source: ModelConfig, target: ModelConfig, pruned_kinds: Iterable[str]
) -> dict[str, float]:
    """``t_m = 1 - target size / source size`` for every pruned kind.

    Raises ``ValueError`` when the target shrinks a dimension that no pruned kind can shrink
    (e.g. fewer heads without ``head``), or when only one of ``head_layer``/``mlp`` would have
    to remove layers (a uniform LLaMA cannot keep half of a layer).
    """
    kinds = tuple(pruned_kinds)
    from megashear.pruning.hard_concrete import ALL_KINDS

    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise ValueError(f"unknown mask kinds {sorted(unknown)}; allowed: {list(ALL_KINDS)}")
    ratio = {
        "hidden": target.hidden_size / source.hidden_size,
        "head": target.num_attention_heads / source.num_attention_heads,
        "intermediate": target.ffn_hidden_size / source.ffn_hidden_size,
        "layer": target.num_layers / source.num_layers,
        "head_layer": target.num_layers / source.num_layers,
        "mlp": target.num_layers / source.num_layers,
    }
    needs = (
        ("hidden", ("hidden",)),
        ("head", ("head",)),
        ("intermediate", ("intermediate",)),
    )
    for dim, by in needs:
        if ratio[dim] < 1 and not set(by) & set(kinds):
            raise ValueError(f"target shrinks {dim} but no pruned kind among {by}")
    if ratio["layer"] < 1 and "layer" not in kinds:
        if not {"head_layer", "mlp"} <= set(kinds):
            raise ValueError(
                "target has fewer layers: prune 'layer', or both 'head_layer' and 'mlp'"
            )
    return {k: 1.0 - ratio[k] for k in kinds}
