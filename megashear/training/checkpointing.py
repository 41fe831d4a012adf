"""Checkpoints with ``megatron.core.dist_checkpointing``: layout-independent, atomic, rotated.

Directory layout::

    SAVE/
      iter_0000020/                  one dist checkpoint (torch_dist) + megashear.json
      iter_0000040/
      latest_checkpointed_iteration.txt   written last, by rename

A checkpoint holds the model (``model`` or ``model0..`` per virtual stage), the optimizer, the LR
scheduler, the iteration, the data source's state and every rank's RNG state. Tensors are stored
by their global shape, so a checkpoint saved at one TP/PP layout loads at any other; the RNG
states are restored only when the layout is unchanged. ``megashear.json`` records the model
shape, the layout and what the checkpoint contains; loading a checkpoint of another model shape
is an error.

A save goes to ``iter_N.tmp`` and is renamed to ``iter_N`` only once every rank has finished;
the ``latest`` pointer is replaced after that. A crash mid-save leaves the previous checkpoint
and pointer untouched; stale ``.tmp`` directories are removed by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
META = "megashear.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int:
    """The iteration of the newest complete checkpoint under ``root``."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint found: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        text = "<binary data>"
    if not text.isdigit():
        raise CheckpointError(f"{path} does not hold an iteration number: {text!r}")
    return int(text)


def resolve(root: str) -> str:
    """A checkpoint directory from a root (via the tracker) or an ``iter_N`` directory itself."""
    if os.path.isfile(os.path.join(root, META)):
        return root
    return iteration_dir(root, read_tracker(root))


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a megashear checkpoint ({META} missing)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} does not describe a model (no 'model' mapping)")
    return meta


def damaged_file(ckpt_dir: str) -> str | None:
    """What is wrong with the files of the dist checkpoint ``ckpt_dir``, if anything can be
    seen without reading the tensors: an unreadable ``.metadata``, or a data file that is missing
    or shorter than the bytes the metadata places in it. None when every file looks complete."""
    import pickle

    path = os.path.join(ckpt_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            storage = pickle.load(f).storage_data
    except FileNotFoundError:
        return f"{path} is missing"
    except Exception as exc:  # a truncated or overwritten pickle raises anything
        detail = (str(exc).strip().splitlines() or ["truncated"])[0]
        return f"{path} is unreadable ({type(exc).__name__}: {detail})"
    need: dict[str, int] = {}
    for info in (storage or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        file = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        have = os.path.getsize(file)
        if have < size:
            return f"{file} is truncated ({have} of {size} bytes)"
    return None


def dist_load(request: dict, ckpt_dir: str, **kwargs) -> dict:
    """``dist_checkpointing.load(request, ckpt_dir)``; any failure to read the files is a
    one-line :class:`CheckpointError` naming the damaged file (or the checkpoint and the
    first line of the underlying error)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(request, ckpt_dir, **kwargs)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        damage = damaged_file(ckpt_dir)
        if damage is not None:
            raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded: {damage}") from exc
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"checkpoint {ckpt_dir} cannot be loaded ({type(exc).__name__}: {first})"
        ) from exc


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _model_sharded_state_dict(model: list[torch.nn.Module], with_masks: bool = True) -> dict:
    out = {}
    for i, chunk in enumerate(model):
        module = getattr(chunk, "module", chunk)
        sd = module.sharded_state_dict()
        if not with_masks:
            sd = {k: v for k, v in sd.items() if not k.startswith("mask_bank.")}
        out[_model_key(i, len(model))] = sd
    return out


def _has_masks(model: list[torch.nn.Module]) -> bool:
    return any(hasattr(getattr(c, "module", c), "mask_bank") for c in model)


def _check_mask_compatibility(meta: dict, model: list[torch.nn.Module], ckpt_dir: str) -> None:
    if "pruning" in meta and not _has_masks(model):
        raise CheckpointError(
            f"{ckpt_dir} is a pruning checkpoint (masked model): run `megashear finalize` on it "
            "first, or continue it with `megashear prune`"
        )


def _load_model_part(model: list[torch.nn.Module], loaded: dict, with_masks: bool) -> None:
    for i, chunk in enumerate(model):
        module = getattr(chunk, "module", chunk)
        result = module.load_state_dict(loaded[_model_key(i, len(model))], strict=with_masks)
        if not with_masks:
            # a plain checkpoint into a masked model: only the mask parameters may be missing
            missing = [k for k in result.missing_keys if not k.startswith("mask_bank.")]
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"checkpoint does not match the model: missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _rng_sharded_object(is_loading: bool = False):
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


def check_model_config(meta: dict, cfg: ModelConfig, ckpt_dir: str) -> None:
    """Raise :class:`CheckpointError` if the checkpoint's model differs from ``cfg`` in any
    weight-defining field (every field but ``seq_length``)."""
    from megashear.model_config import model_differences

    saved = ModelConfig.from_dict(meta["model"])
    diffs = []
    for diff in model_differences(saved, cfg):  # "field: saved != cfg"
        name, values = diff.split(": ", 1)
        in_ckpt, in_cfg = values.split(" != ", 1)
        diffs.append(f"{name}: checkpoint {in_ckpt} != config {in_cfg}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} is of another model shape ({'; '.join(diffs)})"
        )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_dist_save(root: str, iteration: int, state: dict, meta: dict, keep_last: int) -> str:
    """``dist_checkpointing.save`` into ``iter_N.tmp``, then rename and move the tracker."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(state, tmp)
    _barrier()
    if rank == 0:
        _write_text_atomic(os.path.join(tmp, META), json.dumps(meta, indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(os.path.join(root, TRACKER), str(iteration))
        _rotate(root, keep_last)
        logger.info("saved checkpoint %s", final)
    _barrier()
    return final


def save_checkpoint(trainer, root: str, keep_last: int = 2, extra: dict | None = None) -> str:
    """Save the trainer's full state under ``root``; returns the final checkpoint directory."""
    model_sd = _model_sharded_state_dict(trainer.model)
    state = dict(model_sd)
    state["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd)
    state["scheduler"] = trainer.scheduler.state_dict()
    state["iteration"] = trainer.iteration
    state["data"] = trainer.batches.state_dict()
    state["rng_state"] = _rng_sharded_object()
    state["extra"] = trainer.extra_state()
    if extra:
        state.update(extra)
    meta = {
        "model": trainer.model_cfg.to_dict(),
        "layout": _layout(),
        "iteration": trainer.iteration,
        "contents": ["model", "optimizer", "scheduler", "data", "rng"],
        **trainer.extra_meta(),
    }
    return _atomic_dist_save(root, trainer.iteration, state, meta, keep_last)


def save_model_checkpoint(
    model: list[torch.nn.Module],
    cfg: ModelConfig,
    root: str,
    iteration: int = 0,
    extra_meta: dict | None = None,
) -> str:
    """Save the weights alone (a converted, initial or finalised model), loadable at any layout."""
    meta = {
        "model": cfg.to_dict(),
        "layout": _layout(),
        "iteration": iteration,
        "contents": ["model"],
        **(extra_meta or {}),
    }
    return _atomic_dist_save(root, iteration, _model_sharded_state_dict(model), meta, keep_last=0)


def _rotate(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    iters = sorted(
        int(n[len("iter_") :])
        for n in os.listdir(root)
        if n.startswith("iter_") and n[len("iter_") :].isdigit()
    )
    for it in iters[:-keep_last]:
        shutil.rmtree(iteration_dir(root, it), ignore_errors=True)


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
    _check_mask_compatibility(meta, trainer.model, ckpt_dir)
    # A plain (converted, trained or finalised) checkpoint starts a pruning run: weights only,
    # with fresh masks, optimizer and iteration.
    with_masks = "pruning" in meta or not _has_masks(trainer.model)
    if not with_masks:
        contents = {"model"}
    model_sd = _model_sharded_state_dict(trainer.model, with_masks)
    if len(trainer.model) > 1 and "model" in contents and meta["layout"].get("vpp") is None:
        raise CheckpointError(
            f"{ckpt_dir} was saved without virtual pipeline stages; load it without vpp"
        )
    request = dict(model_sd)
    full = "optimizer" in contents
    same_layout = meta.get("layout") == _layout()
    if full:
        request["optimizer"] = trainer.optimizer.sharded_state_dict(model_sd, is_loading=True)
        if same_layout:
            request["rng_state"] = _rng_sharded_object(is_loading=True)
    loaded = dist_load(request, ckpt_dir)
    _load_model_part(trainer.model, loaded, with_masks)
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


def load_model_weights(model: list[torch.nn.Module], cfg: ModelConfig, path: str) -> dict:
    """Load only the weights of any checkpoint (full or model-only) into ``model``.

    Returns the checkpoint's ``megashear.json`` metadata.
    """
    ckpt_dir = resolve(path)
    meta = read_meta(ckpt_dir)
    check_model_config(meta, cfg, ckpt_dir)
    _check_mask_compatibility(meta, model, ckpt_dir)
    with_masks = "pruning" in meta or not _has_masks(model)
    loaded = dist_load(_model_sharded_state_dict(model, with_masks), ckpt_dir)
    _load_model_part(model, loaded, with_masks)
    return meta


def _weight_items(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def _single_process_model(cfg: ModelConfig) -> torch.nn.Module:
    from megashear.config import ParallelConfig
    from megashear.models.llama import build_model, build_transformer_config
    from megashear.parallel import init_distributed, init_model_parallel

    _, world = init_distributed()
    if world != 1:
        raise RuntimeError("full-state-dict checkpoint conversion runs in a single process")
    par = ParallelConfig()
    init_model_parallel(cfg, par)
    return build_model(cfg, build_transformer_config(cfg, par))[0]


def save_megatron_checkpoint(
    full_state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    save_dir: str,
    overwrite: bool = False,
) -> None:
    """Write full (TP1, unsharded) megatron-core weights as a layout-independent checkpoint.

    Args:
        full_state_dict: ``GPTModel.state_dict()`` names (local spec) -> full tensors.
        cfg: the model shape; recorded in the checkpoint.
        save_dir: output root; it must not exist unless ``overwrite``.

    Raises:
        CheckpointError: output exists, or keys/shapes do not match ``cfg``.
    """
    if os.path.exists(save_dir) and not overwrite:
        raise CheckpointError(f"output {save_dir} exists (pass --overwrite to replace it)")
    model = _single_process_model(cfg)
    expected = _weight_items(model)
    missing = sorted(set(expected) - set(full_state_dict))
    unexpected = sorted(set(full_state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"state dict does not match the model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in expected.items():
            src = full_state_dict[name]
            if tuple(src.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{name}: shape {tuple(src.shape)} does not match config {tuple(param.shape)}"
                )
            param.copy_(src.to(param.dtype))
    tmp_root = save_dir.rstrip("/") + ".tmp-save"
    shutil.rmtree(tmp_root, ignore_errors=True)
    save_model_checkpoint([model], cfg, tmp_root)
    if os.path.exists(save_dir):
        shutil.rmtree(save_dir)
    os.replace(tmp_root, save_dir)


def load_megatron_checkpoint(load_dir: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read any megashear checkpoint as full (TP1, unsharded) megatron-core weights."""
    meta = read_meta(resolve(load_dir))
    cfg = ModelConfig.from_dict(meta["model"])
    model = _single_process_model(cfg)
    load_model_weights([model], cfg, load_dir)
    return {k: v.detach().clone() for k, v in _weight_items(model).items()}, cfg
