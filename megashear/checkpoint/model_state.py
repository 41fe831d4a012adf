"""The weights of in-memory megatron-core models, saved and loaded at any TP/PP layout.

A model is a list of chunks (one per virtual pipeline stage, possibly DDP-wrapped); its weights
are stored under ``model`` (one chunk) or ``model0..`` by their global shapes, so a checkpoint
saved at one layout loads at any other. A masked (pruning) model also stores its mask
parameters (``mask_bank.*``); a plain checkpoint loads into a masked model with fresh masks, a
pruning checkpoint does not load into a plain model.
"""

from __future__ import annotations

import torch

from megashear.checkpoint.dist_files import dist_load
from megashear.checkpoint.format import (
    CheckpointError,
    check_model_config,
    model_meta,
    read_meta,
    resolve,
)
from megashear.checkpoint.publish import save_iteration
from megashear.model_config import ModelConfig

MASK_PREFIX = "mask_bank."  # the mask parameters' sharded keys: mask_bank.<kind>_log_alpha
LOG_ALPHA_SUFFIX = "_log_alpha"


def current_layout() -> dict:
    """This process's parallel layout (``tp``, ``pp``, ``dp``, ``vpp``), as recorded in
    ``megashear.json``."""
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def model_sharded_state_dict(model: list[torch.nn.Module], with_masks: bool = True) -> dict:
    """``{"model" | "model<i>": chunk.sharded_state_dict()}``, without the masks unless
    ``with_masks``."""
    out = {}
    for i, chunk in enumerate(model):
        module = getattr(chunk, "module", chunk)
        sd = module.sharded_state_dict()
        if not with_masks:
            sd = {k: v for k, v in sd.items() if not k.startswith(MASK_PREFIX)}
        out[_model_key(i, len(model))] = sd
    return out


def has_masks(model: list[torch.nn.Module]) -> bool:
    """Whether ``model`` is a masked (pruning) model."""
    return any(hasattr(getattr(c, "module", c), "mask_bank") for c in model)


def loads_masks(meta: dict, model: list[torch.nn.Module], ckpt_dir: str) -> bool:
    """Whether loading the checkpoint (``meta``) into ``model`` includes the mask parameters.

    Raises:
        CheckpointError: a pruning checkpoint into a plain model.
    """
    if "pruning" in meta and not has_masks(model):
        raise CheckpointError(
            f"{ckpt_dir} is a pruning checkpoint (masked model): run `megashear finalize` on it "
            "first, or continue it with `megashear prune`"
        )
    return "pruning" in meta or not has_masks(model)


def load_model_part(model: list[torch.nn.Module], loaded: dict, with_masks: bool) -> None:
    """Copy the loaded ``model`` entries of a checkpoint into the chunks of ``model``."""
    for i, chunk in enumerate(model):
        module = getattr(chunk, "module", chunk)
        result = module.load_state_dict(loaded[_model_key(i, len(model))], strict=with_masks)
        if not with_masks:
            # a plain checkpoint into a masked model: only the mask parameters may be missing
            missing = [k for k in result.missing_keys if not k.startswith(MASK_PREFIX)]
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"checkpoint does not match the model: missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )


def save_model_checkpoint(
    model: list[torch.nn.Module],
    cfg: ModelConfig,
    root: str,
    iteration: int = 0,
    extra_meta: dict | None = None,
) -> str:
    """Save the weights alone (a converted, initial or finalised model), loadable at any layout.

    Returns:
        The final checkpoint directory.
    """
    meta = model_meta(cfg, current_layout(), iteration, ["model"], **(extra_meta or {}))
    return save_iteration(root, iteration, model_sharded_state_dict(model), meta, keep_last=0)


def load_model_weights(model: list[torch.nn.Module], cfg: ModelConfig, path: str) -> dict:
    """Load only the weights of any checkpoint (full or model-only) into ``model``.

    Returns:
        The checkpoint's ``megashear.json`` metadata.
    """
    ckpt_dir = resolve(path)
    meta = read_meta(ckpt_dir)
    check_model_config(meta, cfg, ckpt_dir)
    with_masks = loads_masks(meta, model, ckpt_dir)
    loaded = dist_load(model_sharded_state_dict(model, with_masks), ckpt_dir)
    load_model_part(model, loaded, with_masks)
    return meta
