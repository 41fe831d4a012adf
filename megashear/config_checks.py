"""Range checks of a resolved :class:`~megashear.config.RunConfig`, before any rank builds a model.

:mod:`megashear.config_io` checks types and choices; this module checks values: sizes that must
be positive, rates that must be finite, and settings this machine cannot run (bf16 without
CUDA). Each violation is a :class:`~megashear.config_io.ConfigError` naming the key, the value
and what it allows, so that a bad value fails in one line at start-up rather than after warm-up
or in the middle of a forward pass.
"""

from __future__ import annotations

import math

from megashear.config import RunConfig
from megashear.config_io import ConfigError

_POSITIVE_INTS = ("train.micro_batch_size", "train.global_batch_size", "train.log_interval")
_TRAINING_INTS = ("train.train_iters",)
_NON_NEGATIVE_INTS = (
    "train.lr_warmup_iters",
    "data.update_interval",
    "checkpoint.keep_last",
    "data.num_workers",
    "pruning.lagrangian_warmup_steps",
)
_POSITIVE_FLOATS = ("train.lr", "train.adam_eps", "model.norm_epsilon")
_NON_NEGATIVE_FLOATS = (
    "train.min_lr",
    "train.weight_decay",
    "train.clip_grad",
    "data.eta",
    "data.smoothing",
)
_PRUNING_POSITIVE_FLOATS = ("pruning.lr_log_alpha", "pruning.lr_lambda")
_FINITE_FLOATS = ("pruning.log_alpha_init_mean",)


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_run_config(cfg: RunConfig, command: str, cuda: bool) -> None:
    """Raise :class:`ConfigError` for the first out-of-range value ``command`` would use.

    Args:
        command: ``train``, ``prune``, ``finalize`` or ``evaluate``.
        cuda: whether CUDA is available (bf16 needs it).
    """
    if command == "finalize":
        return

    def fail(key: str, value, allowed: str) -> None:
        raise ConfigError(f"config key '{key}': {allowed}, got {value!r}")

    ints = list(_POSITIVE_INTS)
    if command in ("train", "prune"):
        ints += _TRAINING_INTS
    for key in ints:
        if _get(cfg, key) < 1:
            fail(key, _get(cfg, key), "must be at least 1")
    if cfg.data.manifest and cfg.data.eval_sequences_per_domain < 1:
        fail("data.eval_sequences_per_domain", cfg.data.eval_sequences_per_domain,
             "must be at least 1")  # fmt: skip
    for key in _NON_NEGATIVE_INTS:
        if _get(cfg, key) < 0:
            fail(key, _get(cfg, key), "must be 0 or more")
    floats = list(_POSITIVE_FLOATS) + (list(_PRUNING_POSITIVE_FLOATS) if command == "prune" else [])
    for key in floats:
        value = _get(cfg, key)
        if not (math.isfinite(value) and value > 0):
            fail(key, value, "must be a finite number above 0")
    for key in _NON_NEGATIVE_FLOATS:
        value = _get(cfg, key)
        if not (math.isfinite(value) and value >= 0):
            fail(key, value, "must be a finite number, 0 or more")
    for key in _FINITE_FLOATS:
        if not math.isfinite(_get(cfg, key)):
            fail(key, _get(cfg, key), "must be finite")
    if not 0 <= cfg.train.signal_exit_code <= 255:
        fail("train.signal_exit_code", cfg.train.signal_exit_code, "must be an exit code, 0-255")
    if cfg.train.min_lr > cfg.train.lr and command in ("train", "prune"):
        fail("train.min_lr", cfg.train.min_lr, f"must not exceed train.lr = {cfg.train.lr}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp < 2:
        fail(
            "parallel.sequence_parallel",
            True,
            f"needs parallel.tp >= 2 (it splits the sequence over the TP group; tp is "
            f"{cfg.parallel.tp})",
        )
    _check_recompute(cfg, fail)
    if cfg.train.bf16 and not cuda:
        fail("train.bf16", True, "needs CUDA (this machine has none; leave it null or false)")
    if command in ("train", "prune"):
        _check_distill(cfg, fail)


def _check_recompute(cfg: RunConfig, fail) -> None:
    """Recomputation settings that megatron-core would refuse, or that contradict each other."""
    par = cfg.parallel
    if par.recompute_granularity != "full":
        for key in ("recompute_method", "recompute_num_layers"):
            if getattr(par, key) is not None:
                fail(
                    f"parallel.{key}",
                    getattr(par, key),
                    "needs parallel.recompute_granularity=full (it is "
                    f"{par.recompute_granularity})",
                )
        return
    if par.recompute_method is None:
        fail("parallel.recompute_method", None, "must be uniform or block with full recompute")
    if par.recompute_num_layers is None or par.recompute_num_layers < 1:
        fail(
            "parallel.recompute_num_layers",
            par.recompute_num_layers,
            "must be at least 1 with full recompute",
        )
    per_stage = cfg.model.num_layers // max(par.pp * (par.vpp or 1), 1)
    if par.recompute_num_layers > per_stage:
        fail(
            "parallel.recompute_num_layers",
            par.recompute_num_layers,
            f"exceeds the {per_stage} layers of a pipeline stage",
        )


def _check_distill(cfg: RunConfig, fail) -> None:
    """The ``distill`` section of a training or pruning run."""
    import os

    d = cfg.distill
    if not (math.isfinite(d.temperature) and d.temperature > 0):
        fail("distill.temperature", d.temperature, "must be a finite number above 0")
    if not (math.isfinite(d.alpha) and 0 <= d.alpha <= 1):
        fail("distill.alpha", d.alpha, "must be between 0 (LM loss alone) and 1 (KD alone)")
    if d.top_k is not None and d.top_k < 1:
        fail("distill.top_k", d.top_k, "must be at least 1 (or null: the full vocabulary)")
    if d.teacher and not os.path.exists(d.teacher):
        fail("distill.teacher", d.teacher, "does not exist")
