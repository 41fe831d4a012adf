"""``megashear train``: continued pre-training of a (pruned) model."""

from __future__ import annotations

from megashear.config import RunConfig
from megashear.jobs.common import make_batches
from megashear.jobs.run_loop import run_to_end


def run(cfg: RunConfig) -> int | None:
    """Train ``cfg.model`` on the configured data to ``train.train_iters``; the exit code of a
    signal stop, else None."""
    from megashear.training.trainer import Trainer

    trainer = Trainer(
        cfg.model,
        cfg.parallel,
        cfg.train,
        make_batches(cfg),
        cfg.checkpoint,
        distill=cfg.distill,
    )
    return run_to_end(trainer, cfg)
