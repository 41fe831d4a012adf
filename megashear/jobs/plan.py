"""``megashear plan``: which parallel layout fits a prune or train job, and how much each needs.

The source and target are presets or checkpoint directories (only their ``megashear.json`` is
read); nothing is built and nothing imports torch. The result lists the layouts that fit in
``gpu_memory_gib * usable_fraction``, fastest first, each with its per-GPU bytes by category
(:mod:`megashear.planning.memory`).
"""

from __future__ import annotations

import dataclasses
import logging
import os

from megashear.model_config import PRESETS, ModelConfig, get_preset
from megashear.planning import PlanConfig
from megashear.planning import memory as mem

logger = logging.getLogger(__name__)

_LAYOUT_FIELDS = {
    "tp": "tp",
    "pp": "pp",
    "vpp": "vpp",
    "use_distributed_optimizer": "distributed_optimizer",
    "sequence_parallel": "sequence_parallel",
    "recompute_granularity": "recompute",
    "recompute_method": "recompute_method",
    "recompute_num_layers": "recompute_num_layers",
}


def load_shape(name: str, what: str) -> ModelConfig:
    """A model preset or a checkpoint directory's model (its ``megashear.json``)."""
    if name in PRESETS:
        return get_preset(name)
    if os.path.isdir(name):
        from megashear.checkpoint.format import read_meta, resolve

        return ModelConfig.from_dict(read_meta(resolve(name))["model"])
    raise ValueError(
        f"{what} {name!r} is neither a model preset nor a checkpoint directory; presets: "
        f"{sorted(PRESETS)}"
    )


def resolve_target(cfg: PlanConfig, source: ModelConfig) -> ModelConfig | None:
    """The target shape (None: no target given) from ``cfg.target`` and the ``target_*``
    fields, as ``megashear prune`` builds it (:func:`megashear.pruning.targets.make_target`)."""
    from megashear.pruning.targets import TARGET_FIELDS, TARGET_PRESETS, make_target

    fields = {f: getattr(cfg, f"target_{f}") for f in TARGET_FIELDS}
    preset = ""
    if cfg.target in TARGET_PRESETS:
        preset = cfg.target
    elif cfg.target:
        shape = load_shape(cfg.target, "target")
        for key in fields:
            if fields[key] is None:
                fields[key] = getattr(shape, key)
    elif all(v is None for v in fields.values()):
        return None
    return make_target(source, preset, **fields)


def pruned_kinds(source: ModelConfig, target: ModelConfig, kinds: tuple[str, ...]) -> tuple:
    """The kinds the run learns: those whose dimension the target shrinks (as
    :class:`~megashear.training.pruning_trainer.PruningTrainer` keeps them)."""
    shrinks = {
        "hidden": target.hidden_size < source.hidden_size,
        "head": target.num_attention_heads < source.num_attention_heads,
        "intermediate": target.ffn_hidden_size < source.ffn_hidden_size,
    }
    fewer_layers = target.num_layers < source.num_layers
    return tuple(k for k in kinds if shrinks.get(k, fewer_layers))


def workload(cfg: PlanConfig) -> tuple[mem.Workload, ModelConfig, ModelConfig | None]:
    """The :class:`~megashear.planning.memory.Workload` of ``cfg``, with source and target."""
    from megashear.pruning.targets import validate_target

    source = load_shape(cfg.source, "source")
    target = resolve_target(cfg, source)
    seq = cfg.seq_length or source.seq_length
    for name in ("micro_batch_size", "global_batch_size", "gpus", "gpus_per_node", "top"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if seq < 1 or cfg.gpu_memory_gib <= 0 or not 0 < cfg.usable_fraction <= 1:
        raise ValueError("seq_length, gpu_memory_gib must be positive, usable_fraction in (0, 1]")
    common = dict(
        seq_length=seq,
        micro_batch_size=cfg.micro_batch_size,
        global_batch_size=cfg.global_batch_size,
        dtype=cfg.dtype,
        backend=cfg.backend,
        teacher=source if cfg.teacher else None,
    )
    if cfg.job == "prune":
        if target is None:
            raise ValueError("prune needs a target: set target or target_* fields")
        validate_target(source, target)
        kinds = pruned_kinds(source, target, tuple(cfg.kinds))
        if not kinds:
            raise ValueError("the target is the source shape: nothing to prune")
        work = mem.Workload(model=source, job="prune", kinds=kinds, **common)
    else:
        work = mem.Workload(model=target or source, job="train", **common)
    return work, source, target


def fixed_layout(cfg: PlanConfig) -> dict:
    """The layout fields ``cfg.layout`` fixes, as :class:`~megashear.planning.memory.Layout`
    field names; contradictory ones are a one-line ``ValueError``."""
    lay = cfg.layout
    if lay.sequence_parallel and lay.tp is not None and lay.tp < 2:
        raise ValueError("layout.sequence_parallel needs layout.tp >= 2 (it splits over TP)")
    gran = lay.recompute_granularity
    if (lay.recompute_method or lay.recompute_num_layers is not None) and gran != "full":
        raise ValueError(
            "layout.recompute_method and layout.recompute_num_layers need "
            f"layout.recompute_granularity=full, not {gran or 'null'}"
        )
    if lay.recompute_num_layers is not None and lay.recompute_num_layers < 1:
        raise ValueError(f"layout.recompute_num_layers must be >= 1: {lay.recompute_num_layers}")
    return {
        ours: getattr(lay, theirs)
        for theirs, ours in _LAYOUT_FIELDS.items()
        if getattr(lay, theirs) is not None
    }


def _table(estimates: list[mem.Estimate]) -> str:
    head = ["layout", *mem.CATEGORIES, "total", "time"]
    rows = [
        [
            e.layout.describe(),
            *(f"{e.bytes[c] / mem.GIB:.2f}" for c in mem.CATEGORIES),
            f"{e.total / mem.GIB:.2f}",
            f"{e.cost:.3f}",
        ]
        for e in estimates
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join(lines)


def run(cfg: PlanConfig) -> dict:
    """Plan ``cfg``: the fitting layouts (at most ``cfg.top``), fastest first, as a dict
    (GiB per GPU by category); a readable table goes to the log.

    Raises:
        ValueError: unknown preset, an infeasible target or layout, contradictory layout
            fields, or no layout that fits (the message names the smallest one).
    """
    work, source, target = workload(cfg)
    fixed = fixed_layout(cfg)
    usable = cfg.gpu_memory_gib * cfg.usable_fraction
    estimates = mem.plan_layouts(work, cfg.gpus, usable, cfg.gpus_per_node, fixed)
    if not estimates:
        if "tp" in fixed and "pp" in fixed:
            tp, pp = fixed["tp"], fixed["pp"]
            if cfg.gpus % (tp * pp):
                raise ValueError(f"tp {tp} x pp {pp} does not divide {cfg.gpus} GPUs")
            given = {k: v for k, v in fixed.items() if k not in ("tp", "pp")}
            if given.get("recompute") == "full":
                given.setdefault("recompute_method", "uniform")
                given.setdefault("recompute_num_layers", 1)
            mem.check_layout(work, mem.Layout(tp=tp, pp=pp, dp=cfg.gpus // (tp * pp), **given))
        raise ValueError(
            f"no layout of {cfg.gpus} GPUs (at most {cfg.gpus_per_node} per node for TP) can "
            f"run this model with the given layout fields {fixed or '{}'}"
        )
    fitting = [e for e in estimates if e.fits]
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total)
        raise ValueError(
            f"no layout fits in {usable:.1f} GiB per GPU ({cfg.gpu_memory_gib:g} GiB x "
            f"{cfg.usable_fraction:g}): the smallest, {smallest.layout.describe()}, needs "
            f"{smallest.total / mem.GIB:.1f} GiB"
        )
    shown = fitting[: cfg.top]
    logger.info(
        "%d of %d layouts fit in %.1f GiB per GPU; fastest first (GiB per GPU):\n%s",
        len(fitting),
        len(estimates),
        usable,
        _table(shown),
    )
    return {
        "job": work.job,
        "teacher": cfg.teacher,
        "source": cfg.source,
        "model": dataclasses.asdict(work.model),
        "target": dataclasses.asdict(target) if target is not None else None,
        "kinds": list(work.kinds),
        "seq_length": work.seq_length,
        "micro_batch_size": work.micro_batch_size,
        "global_batch_size": work.global_batch_size,
        "dtype": work.dtype,
        "gpus": cfg.gpus,
        "usable_gib": round(usable, 2),
        "layouts_tried": len(estimates),
        "layouts_fitting": len(fitting),
        "recommended": shown[0].layout.describe(),
        "layouts": [
            {**e.to_dict(), "gib": {k: round(v / mem.GIB, 3) for k, v in e.bytes.items()}}
            for e in shown
        ],
    }
