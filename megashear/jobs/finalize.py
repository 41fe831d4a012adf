"""``megashear finalize``: a pruning checkpoint -> a dense checkpoint of the target shape."""

from __future__ import annotations

from megashear.config import RunConfig
from megashear.jobs.common import UsageError


def run(cfg: RunConfig) -> dict:
    """Finalise ``checkpoint.load`` into ``checkpoint.save``; the result rank 0 prints."""
    from megashear import platform
    from megashear.finalize_run import finalize_checkpoint

    if not cfg.checkpoint.load or not cfg.checkpoint.save:
        raise UsageError("finalize needs checkpoint.load (pruning run) and checkpoint.save")
    platform.install("streaming")  # keep freed pages, one malloc arena for its threads
    out = finalize_checkpoint(cfg.checkpoint.load, cfg.checkpoint.save)
    return {
        "finalized": cfg.checkpoint.save,
        "model": out.to_dict(),
        "parameters": out.num_parameters(),
    }
