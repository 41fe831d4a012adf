"""``megashear importance``: activation importance of a checkpoint's units, at any layout.

A calibration batch of ``importance.samples`` sequences is drawn from the training data (the
manifest's training split, a token file, or synthetic tokens) and run forward, without
gradients, through the plain model under ``parallel.*``; forward hooks score every query head,
FFN unit, hidden channel and layer (:mod:`megashear.training.importance_pass`, docs/method.md
§8). Rank 0 writes the scores, with the model and the checkpoint's fingerprint, to
``importance.path`` (default: ``importance.pt`` in the checkpoint root), through a temporary
name and a rename. ``megashear one-shot`` and ``pruning.init=importance`` read them.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch.distributed as dist

from megashear.config import RunConfig
from megashear.jobs.common import UsageError, is_rank0, make_batches

logger = logging.getLogger(__name__)


def scores_path(cfg: RunConfig) -> str:
    """``importance.path``, or ``importance.pt`` in the root of the source checkpoint."""
    from megashear.pruning.importance import default_path

    if cfg.importance.path:
        return cfg.importance.path
    source = cfg.checkpoint.load or cfg.checkpoint.init
    if not source:
        raise UsageError("set importance.path or checkpoint.load (the scored checkpoint)")
    return default_path(source)


def run(cfg: RunConfig) -> dict:
    from megashear.checkpoint.format import fingerprint, resolve
    from megashear.checkpoint.model_state import load_model_weights
    from megashear.models.llama import layer_spec
    from megashear.pruning.importance import save_scores, summary
    from megashear.training.importance_pass import calibrate
    from megashear.training.trainer import Trainer

    if not cfg.checkpoint.load:
        raise UsageError("importance needs checkpoint.load (the model to score)")
    if cfg.checkpoint.save:
        raise UsageError(
            "importance writes importance.path, not a checkpoint: unset checkpoint.save"
        )
    n = cfg.importance.samples
    if n < 1:
        raise UsageError(f"config key 'importance.samples': must be at least 1, got {n}")
    path = scores_path(cfg)
    try:
        batches = make_batches(cfg)
    except UsageError as exc:
        raise UsageError(str(exc).replace("no training data", "no calibration data")) from None
    train = dataclasses.replace(cfg.train, global_batch_size=n)
    local_spec = layer_spec(use_te=False)  # separate norm modules, whose outputs are hooked
    trainer = Trainer(cfg.model, cfg.parallel, train, batches, spec=lambda _: local_spec)
    load_model_weights(trainer.model, cfg.model, cfg.checkpoint.load)
    scores = calibrate(trainer, batches.next_global_batch(n))
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    record = {
        "model": cfg.model.to_dict(),
        "checkpoint": os.path.abspath(resolve(cfg.checkpoint.load)),
        "fingerprint": fingerprint(cfg.checkpoint.load),
        "samples": n,
        "seq_length": cfg.model.seq_length,
        "data": cfg.data.manifest or cfg.data.token_file or "synthetic",
    }
    if is_rank0():
        save_scores(path, scores, record)
        logger.info("importance scores of %d samples written to %s", n, path)
    if dist.is_initialized():
        dist.barrier()
    return {"importance": path, "samples": n, **summary(scores)}


def pruning_start(cfg: RunConfig, target) -> tuple[dict | None, list[int]]:
    """The initial log α of ``pruning.init`` (None: the paper's N(mean, 0.01)) and the pinned
    hidden channels of ``pruning.pin_hidden``, from the scores at ``importance.path``."""
    from megashear.checkpoint.format import fingerprint, read_meta, resolve
    from megashear.checkpoint.pruning_record import read_pruning_record
    from megashear.pruning.importance import importance_log_alpha, load_scores, pinned_hidden
    from megashear.pruning.targets import target_sparsities

    p = cfg.pruning
    if not p.pin_hidden >= 0:  # NaN too
        raise UsageError(f"config key 'pruning.pin_hidden': must be 0 or more, got {p.pin_hidden}")
    if p.init != "importance" and p.pin_hidden == 0:
        return None, []
    source = cfg.checkpoint.load or cfg.checkpoint.init
    if not source:
        raise UsageError("pruning.init=importance and pruning.pin_hidden need a source checkpoint")
    resolved = resolve(source)
    resumed = read_pruning_record(read_meta(resolved), resolved)
    if resumed is not None:
        # resuming a pruning run: log α come from its checkpoint, the pinned channels from its
        # record (the scores were read when it started)
        return None, list(resumed.pinned_hidden)
    path = scores_path(cfg)
    record = load_scores(path, cfg.model, fingerprint(source))
    scores = record["scores"]
    kinds = tuple(k for k, t in target_sparsities(cfg.model, target, p.kinds).items() if t > 0)
    init = None
    if p.init == "importance":
        init = importance_log_alpha(scores, cfg.model, target, kinds)
    pinned = pinned_hidden(scores, target, p.pin_hidden)
    if pinned:
        logger.info("pinned hidden channels (never sampled, always kept): %s", pinned)
    return init, pinned
