"""``megashear prune``: targeted structured pruning with hard-concrete masks."""

from __future__ import annotations

from megashear.config import RunConfig
from megashear.jobs.common import make_batches, pruning_target
from megashear.jobs.run_loop import run_to_end


def run(cfg: RunConfig) -> int | None:
    """Learn masks that cut ``cfg.model`` to the pruning target (checked against the layout
    first); the exit code of a signal stop, else None."""
    from megashear.jobs.importance import pruning_start
    from megashear.pruning.targets import validate_target
    from megashear.training.pruning_trainer import PruningTrainer

    target = pruning_target(cfg)
    validate_target(cfg.model, target, tp_sizes=(cfg.parallel.tp,), pp_sizes=(cfg.parallel.pp,))
    init_log_alpha, pinned = pruning_start(cfg, target)
    trainer = PruningTrainer(
        cfg.model,
        target,
        cfg.pruning,
        cfg.parallel,
        cfg.train,
        make_batches(cfg),
        cfg.checkpoint,
        distill=cfg.distill,
        init_log_alpha=init_log_alpha,
        pinned_hidden=pinned,
    )
    return run_to_end(trainer, cfg, kind="prune")
