"""The training loop the ``train`` and ``prune`` jobs share: the resolved config beside the
run, the run log, dynamic batch loading, the progress bar, signals and the last save."""

from __future__ import annotations

import os
import sys
import time

from megashear import config_io
from megashear.config import RunConfig
from megashear.jobs.common import UsageError, is_rank0


def write_resolved_config(cfg: RunConfig) -> None:
    """Rank 0 writes the resolved config beside the logs and the checkpoints."""
    if not is_rank0():
        return
    for directory in {cfg.logging.dir, cfg.checkpoint.save}:
        if directory:
            os.makedirs(directory, exist_ok=True)
            config_io.dump_yaml(cfg, os.path.join(directory, "config.yaml"))


def make_dynamic_loading(cfg: RunConfig, trainer, log, kind: str = "train"):
    """Dynamic batch loading for a manifest-driven run (None otherwise). With
    ``logging.p2_law``, a ``train`` run's updates also log the P² law's predicted loss."""
    p2_predict = None
    if cfg.logging.p2_law and kind == "train":
        if not cfg.data.manifest:
            raise UsageError("logging.p2_law needs validation losses: set data.manifest")
        from megashear.jobs.fit_p2 import train_predictor

        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        p2_predict = train_predictor(
            cfg.logging.p2_law, cfg.model.num_parameters(), tokens_per_step
        )
    if not cfg.data.manifest:
        return None
    from megashear.data.loader import data_cache_dir, validation_batches
    from megashear.training.dynamic_loading import DynamicBatchLoading

    manifest = trainer.batches.manifest
    valid = validation_batches(
        manifest,
        cfg.model.seq_length,
        cfg.data.eval_sequences_per_domain,
        data_cache_dir(cfg),
    )
    return DynamicBatchLoading(
        trainer.batches,
        valid,
        manifest.references(),
        cfg.data.update_rule,
        cfg.data.eta,
        cfg.data.smoothing,
        cfg.data.update_interval,
        log,
        p2_predict=p2_predict,
    )


def run_training(trainer, cfg: RunConfig, log, kind: str = "train") -> list[dict]:
    """Train to ``train.train_iters`` with a rank-0 progress bar, logging and checkpoints."""
    from tqdm import tqdm

    dynamic = make_dynamic_loading(cfg, trainer, log, kind)

    total = cfg.train.train_iters
    bar = tqdm(
        total=total, initial=trainer.iteration, disable=not is_rank0(), desc=kind, unit="step"
    )

    def on_step(stats: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{stats['tokens_per_s']:.0f}")
        log.log(kind, stats["iteration"], stats)
        if dynamic is not None:
            dynamic(trainer, stats)

    from megashear.training.signals import ExitSignals

    try:
        with ExitSignals() as signals:
            return trainer.train(callback=on_step, signals=signals)
    finally:
        bar.close()
        close = getattr(trainer.batches, "close", None)  # stop DataLoader workers, if any
        if close is not None:
            close()


def run_to_end(trainer, cfg: RunConfig, kind: str = "train") -> int | None:
    """Record the resolved config, train to the end (or a signal), save the last step unless
    its interval save has, and log a summary; the exit code of a signal stop, else None."""
    from megashear.training.run_log import RunLog

    write_resolved_config(cfg)
    log = RunLog(
        cfg.logging.dir,
        enabled=is_rank0(),
        tensorboard=cfg.logging.tensorboard,
        resume_from=trainer.iteration,
    )
    start = time.time()
    history = run_training(trainer, cfg, log, kind=kind)
    interval = cfg.checkpoint.save_interval
    if cfg.checkpoint.save and not (history and interval and trainer.iteration % interval == 0):
        trainer.save()
    log.log("summary", trainer.iteration, {"seconds": time.time() - start})
    log.close()
    return interrupted(trainer, cfg)


def interrupted(trainer, cfg: RunConfig) -> int | None:
    """``train.signal_exit_code`` when a signal stopped the run (its checkpoint is saved), else
    None."""
    if not trainer.exit_signal:
        return None
    import signal

    where = f"saved at {cfg.checkpoint.save}" if cfg.checkpoint.save else "checkpoint.save unset"
    if is_rank0():
        print(
            f"stopped by {signal.Signals(trainer.exit_signal).name} after step "
            f"{trainer.iteration} ({where})",
            file=sys.stderr,
        )
    return cfg.train.signal_exit_code
