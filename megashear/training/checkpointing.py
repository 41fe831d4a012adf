"""The trainer's checkpoints: its full state saved and resumed at any layout, atomically.

A checkpoint (see :mod:`megashear.checkpoint.format` for the directory layout) holds the model
(``model`` or ``model0..`` per virtual stage), the optimizer, the LR scheduler, the iteration,
the data source's state and every rank's RNG state. Tensors are stored by their global shape, so
a checkpoint saved at one TP/PP layout loads at any other; the RNG states are restored only when
the layout is unchanged. A model-only checkpoint (converted, initial or finalised) starts a run
with its weights (:mod:`megashear.checkpoint.model_state`). Saves are published atomically and
rotated by :func:`megashear.checkpoint.publish.save_iteration`.
"""

from __future__ import annotations

import logging

import torch

from megashear.checkpoint.dist_files import dist_load
from megashear.checkpoint.format import (
    CheckpointError,
    check_model_config,
    model_meta,
    read_meta,
    resolve,
)
from megashear.checkpoint.model_state import (
    current_layout,
    load_model_part,
    loads_masks,
    model_sharded_state_dict,
)
from megashear.checkpoint.publish import save_iteration

logger = logging.getLogger(__name__)


def _rng_sharded_object(is_loading: bool = False):
    """This rank's CPU and tracker RNG states as one shard of a (pp, tp, dp) object."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = None
    if not is_loading:
        state = {
            "cpu": torch.get_rng_state(),
            "tracker": get_cuda_rng_tracker().get_states(),
        }
    pp, tp, dp = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def save_checkpoint(trainer, root: str, keep_last: int = 2, extra: dict | None = None) -> str:
    """Save the trainer's full state under ``root``; returns the final checkpoint directory."""
    model_sd = model_sharded_state_dict(trainer.model)
    state = dict(model_sd)
    state["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd)
    state["scheduler"] = trainer.scheduler.state_dict()
    state["iteration"] = trainer.iteration
    state["data"] = trainer.batches.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["extra"] = trainer.extra_state()
    if extra:
        state.update(extra)
    contents = ["model", "optimizer", "scheduler", "data", "rng"]
    meta = model_meta(
        trainer.model_cfg, current_layout(), trainer.iteration, contents, **trainer.extra_meta()
    )
    return save_iteration(root, trainer.iteration, state, meta, keep_last)


SCHEDULE_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")


def _log_schedule_changes(scheduler, saved: dict, ckpt_dir: str) -> None:
    """Warn about the LR-schedule settings a resumed run changes (the config's values win)."""
    changed = [
        f"{k} {saved[k]} -> {getattr(scheduler, k)}"
        for k in SCHEDULE_FIELDS
        if k in saved and saved[k] != getattr(scheduler, k)
    ]
    if changed:
        logger.warning(
            "resuming %s with a changed LR schedule (the config's values are used): %s",
            ckpt_dir,
            ", ".join(changed),
        )


def load_checkpoint(trainer, path: str) -> None:
    """Load a checkpoint (root or ``iter_N`` dir) into the trainer, at any layout.

    A model-only checkpoint (a converted or finalised model) loads the weights and starts at
    iteration 0 with a fresh optimizer.
    """
    ckpt_dir = resolve(path)
    meta = read_meta(ckpt_dir)
    check_model_config(meta, trainer.model_cfg, ckpt_dir)
    contents = set(meta.get("contents", ["model"]))
    # A plain (converted, trained or finalised) checkpoint starts a pruning run: weights only,
    # with fresh masks, optimizer and iteration.
    with_masks = loads_masks(meta, trainer.model, ckpt_dir)
    if not with_masks:
        contents = {"model"}
    model_sd = model_sharded_state_dict(trainer.model, with_masks)
    if len(trainer.model) > 1 and "model" in contents and meta["layout"].get("vpp") is None:
        raise CheckpointError(
            f"{ckpt_dir} was saved without virtual pipeline stages; load it without vpp"
        )
    request = dict(model_sd)
    full = "optimizer" in contents
    same_layout = meta.get("layout") == current_layout()
    if full:
        request["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd, is_loading=True)
        if same_layout:
            request["rng_state"] = _rng_sharded_object(is_loading=True)
    loaded = dist_load(request, ckpt_dir)
    load_model_part(trainer.model, loaded, with_masks)
    if full:
        # each group's peak / final LR is the config's, not the checkpoint's (see the scheduler)
        group_lrs = [
            {k: g[k] for k in ("max_lr", "min_lr") if k in g}
            for g in trainer.optimizer.param_groups
        ]
        trainer.optimizer.load_state_dict(loaded["optimizer"])
        for group, lrs in zip(trainer.optimizer.param_groups, group_lrs):
            group.update(lrs)
        _log_schedule_changes(trainer.scheduler, loaded["scheduler"], ckpt_dir)
        trainer.scheduler.load_state_dict(loaded["scheduler"])
        trainer.iteration = int(loaded["iteration"])
        trainer.batches.load_state_dict(loaded["data"])
        trainer.load_extra_state(loaded.get("extra") or {})
        if same_layout and loaded.get("rng_state") is not None:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            torch.set_rng_state(loaded["rng_state"]["cpu"])
            get_cuda_rng_tracker().set_states(loaded["rng_state"]["tracker"])
    logger.info("loaded checkpoint %s (iteration %d)", ckpt_dir, trainer.iteration)
