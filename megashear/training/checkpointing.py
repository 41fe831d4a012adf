"""The trainer's checkpoints: its full state saved and resumed at any layout, atomically.

A checkpoint (see :mod:`megashear.checkpoint.format` for the directory layout) holds the model
(``model`` or ``model0..`` per virtual stage), the optimizer, the LR scheduler, the iteration,
the data source's state and every rank's RNG state. Tensors are stored by their global shape, so
a checkpoint saved at one TP/PP layout loads at any other; the RNG states are restored only when
the layout is unchanged. The optimizer state is stored in model space, one tensor per parameter
and kind of state (``optimizer.state.exp_avg.<param key>``, ...): the distributed optimizer saves
megatron-core's ``fully_reshardable`` format, so a checkpoint moves between DP sizes and between
the distributed and the plain optimizer (:func:`_cross_optimizer_request`). A model-only checkpoint (converted, initial or finalised) starts a run
with its weights (:mod:`megashear.checkpoint.model_state`). Saves are published atomically and
rotated by :func:`megashear.checkpoint.publish.save_iteration`.
"""

from __future__ import annotations

import dataclasses
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


# The distributed optimizer's checkpoint format: per-parameter tensors in model space (gathered
# over DP at save), loadable at any DP size; megatron-core's default in 0.16
# (fully_sharded_model_space) is refused by its own dist_checkpointing ("flattened_range is not
# supported").
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Keys of the fp32 master weights: the distributed optimizer's, and the plain bf16 optimizer's.
DIST_MASTER, PLAIN_MASTER = "optimizer.state.param.", "optimizer.state.fp32_param."


def _float16_sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
    """megatron-core's ``Float16OptimizerWithFloat16Params.sharded_state_dict`` for a model
    that also has fp32 parameters (the pruning masks' log α in a bf16 run; on CPU the torch
    norms' weights too).

    megatron's maps optimizer state ids to the 16-bit parameters alone, as if every parameter
    were 16-bit and came first in its group: with an fp32 parameter in a group its save raises
    "Param id N does not match any model sharded param". Here the ids follow the inner
    optimizer's own order (a 16-bit parameter stands for its fp32 master, an fp32 parameter for
    itself), and the masters' ids are those at the masters' places in their groups; the keys
    and the structure are megatron's.
    """
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    model_of = {
        id(main): param
        for params, mains in zip(self.float16_groups, self.fp32_from_float16_groups)
        for param, main in zip(params, mains)
    }
    ordered = [model_of.get(id(p), p) for g in self.optimizer.param_groups for p in g["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, ordered)
    converted = []
    for group, state_group, mains in zip(
        self.optimizer.param_groups,
        state_dict["optimizer"]["param_groups"],
        state_dict["fp32_from_fp16_params"],
    ):
        master_ids = [
            pid for p, pid in zip(group["params"], state_group["params"]) if id(p) in model_of
        ]
        converted.append(
            [
                make_sharded_optimizer_tensor(id_to_sharded[pid], main, prefix=PLAIN_MASTER[:-1])
                for pid, main in zip(master_ids, mains)
            ]
        )
    state_dict["fp32_from_fp16_params"] = converted
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def optimizer_sharded_state_dict(trainer, model_sd: dict, is_loading: bool = False) -> dict:
    """The trainer's optimizer state as a sharded state dict (the distributed optimizer in its
    ``fully_reshardable`` format; megatron's bf16 optimizer through
    :func:`_float16_sharded_state_dict` when the model has fp32 parameters)."""
    import types

    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        if isinstance(opt, Float16OptimizerWithFloat16Params) and any(opt.fp32_from_fp32_groups):
            opt.sharded_state_dict = types.MethodType(_float16_sharded_state_dict, opt)
    return trainer.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata=dict(OPTIMIZER_METADATA)
    )


def optimizer_kind(trainer) -> str:
    """``distributed`` or ``plain``: which megatron-core optimizer the trainer runs."""
    return "distributed" if trainer.par.use_distributed_optimizer else "plain"


def save_checkpoint(trainer, root: str, keep_last: int = 2, extra: dict | None = None) -> str:
    """Save the trainer's full state under ``root``; returns the final checkpoint directory."""
    model_sd = model_sharded_state_dict(trainer.model)
    state = dict(model_sd)
    state["optimizer"] = optimizer_sharded_state_dict(trainer, model_sd)
    state["scheduler"] = trainer.scheduler.state_dict()
    state["iteration"] = trainer.iteration
    state["data"] = trainer.batches.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["extra"] = trainer.extra_state()
    if extra:
        state.update(extra)
    contents = ["model", "optimizer", "scheduler", "data", "rng"]
    meta = model_meta(
        trainer.model_cfg,
        current_layout(),
        trainer.iteration,
        contents,
        optimizer=optimizer_kind(trainer),
        **trainer.extra_meta(),
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


def _cross_optimizer_request(trainer, model_sd: dict, ckpt_dir: str) -> tuple[dict, dict, dict]:
    """The optimizer's load request for a checkpoint of the other optimizer kind:
    ``(sharded tensors, master weights to load apart, everything else)``.

    Both kinds store Adam's moments under the same model-space keys
    (``optimizer.state.exp_avg.<param key>``). They differ in the fp32 master weights: the
    distributed optimizer stores one for every parameter (``optimizer.state.param.<key>``), the
    plain one for its 16-bit parameters only (``optimizer.state.fp32_param.<key>``): an fp32
    parameter is its own master, so those masters are read from the weights themselves
    (``<key>``), in a load of their own. The non-tensor state is this optimizer's own (its
    groups, the sharding type), not the checkpoint's.
    """
    from megatron.core.dist_checkpointing.dict_utils import (
        dict_list_map_inplace,
        extract_matching_values,
    )
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
    from megatron.core.dist_checkpointing.utils import extract_sharded_base
    from torch.distributed.checkpoint import FileSystemReader

    stored = set(FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata)
    request = optimizer_sharded_state_dict(trainer, model_sd, is_loading=True)
    sharded, rest = extract_sharded_base(request)
    # what dist_checkpointing.load would hand back as it is (the groups' parameter indices)
    dict_list_map_inplace(
        lambda v: v.unwrap() if isinstance(v, LocalNonpersistentObject) else v, rest
    )

    def own_master(v) -> bool:  # a distributed master the plain optimizer did not store
        if not isinstance(v, ShardedBase) or not v.key.startswith(DIST_MASTER):
            return False
        return PLAIN_MASTER + v.key[len(DIST_MASTER) :] not in stored

    masters, sharded = extract_matching_values(sharded, own_master)
    dict_list_map_inplace(lambda v: dataclasses.replace(v, key=v.key[len(DIST_MASTER) :]), masters)

    def to_saved_key(value):
        key = value.key
        if key.startswith(DIST_MASTER):  # loading into the distributed optimizer
            return dataclasses.replace(value, key=PLAIN_MASTER + key[len(DIST_MASTER) :])
        if key.startswith(PLAIN_MASTER):  # loading into the plain bf16 optimizer
            return dataclasses.replace(value, key=DIST_MASTER + key[len(PLAIN_MASTER) :])
        return value

    dict_list_map_inplace(to_saved_key, sharded)
    return sharded, masters, rest


def _merge(rest, loaded):
    """``rest`` (a request's non-tensor part) with the ``loaded`` tensors put back in place;
    a list whose items were all tensors is empty in ``rest`` and whole in ``loaded``."""
    if isinstance(rest, dict) and isinstance(loaded, dict):
        out = dict(rest)
        for key, value in loaded.items():
            out[key] = _merge(rest[key], value) if key in rest else value
        return out
    if isinstance(rest, list) and isinstance(loaded, list):
        if not rest or not loaded:
            return list(rest or loaded)
        if len(rest) != len(loaded):
            raise CheckpointError(f"optimizer state of {len(loaded)} items where {len(rest)} go")
        return [_merge(a, b) for a, b in zip(rest, loaded)]
    return loaded


def _set_step(state, step: int) -> None:
    """Adam's step count where each optimizer kind keeps it in its state dict: every group
    (distributed), ``state.common_step`` (a torch optimizer's state dict, plain)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            for group in state["param_groups"]:
                group["step"] = step
            if isinstance(state.get("state"), dict):
                state["state"]["common_step"] = torch.tensor(float(step))
        for v in state.values():
            _set_step(v, step)
    elif isinstance(state, list):
        for v in state:
            _set_step(v, step)


def _init_distributed_optimizer_state(trainer) -> None:
    """Give a fresh distributed optimizer its Adam state (zeros, step 0) before a load.

    Without TE or apex, megatron-core's ``DistributedOptimizer.state_dict`` reads the step
    from the inner torch optimizer's per-parameter state, which is empty until the first step
    (``assert len(steps) == 1``); the load overwrites these values."""
    if optimizer_kind(trainer) != "distributed":
        return
    for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None or len(inner.state):
            continue
        init(inner, opt.config)
        for state in inner.state.values():
            state.setdefault("step", torch.tensor(0.0))


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
        _init_distributed_optimizer_state(trainer)
    saved_kind = meta.get("optimizer", "plain")  # checkpoints before this field: plain
    cross = full and saved_kind != optimizer_kind(trainer)
    if cross:
        request["optimizer_tensors"], masters, optimizer_rest = _cross_optimizer_request(
            trainer, model_sd, ckpt_dir
        )
    elif full:
        request["optimizer"] = optimizer_sharded_state_dict(trainer, model_sd, is_loading=True)
    if full:
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
        if cross:
            logger.info(
                "loading the %s optimizer's state of %s into the %s optimizer",
                saved_kind,
                ckpt_dir,
                optimizer_kind(trainer),
            )
            optimizer_state = _merge(optimizer_rest, loaded["optimizer_tensors"])
            if masters:
                optimizer_state = _merge(
                    optimizer_state, dist_load({"masters": masters}, ckpt_dir)["masters"]
                )
            _set_step(optimizer_state, int(loaded["iteration"]))
        else:
            optimizer_state = loaded["optimizer"]
        trainer.optimizer.load_state_dict(optimizer_state)
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
