"""Full (TP1, unsharded) megatron-core weights through a real ``GPTModel`` built in one process.

The reference path next to the streaming one (:mod:`megashear.checkpoint.dist_stream`): it
holds the whole model in memory, and megatron-core's own ``sharded_state_dict`` decides what is
saved, so the tests compare the streaming writer and reader against it.
"""

from __future__ import annotations

import torch

from megashear.checkpoint.format import CheckpointError, read_meta, resolve
from megashear.checkpoint.model_state import load_model_weights, save_model_checkpoint
from megashear.checkpoint.publish import check_new_output, publish_dir
from megashear.model_config import ModelConfig


def weight_items(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` without the ``_extra_state`` entries."""
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def single_process_model(cfg: ModelConfig) -> torch.nn.Module:
    """A plain ``GPTModel`` of ``cfg`` at TP1PP1 (initialising a one-process group if needed)."""
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
    check_new_output(save_dir, overwrite)
    model = single_process_model(cfg)
    expected = weight_items(model)
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
    publish_dir(save_dir, lambda tmp: save_model_checkpoint([model], cfg, tmp))


def load_megatron_checkpoint(load_dir: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read any megashear checkpoint as full (TP1, unsharded) megatron-core weights."""
    meta = read_meta(resolve(load_dir))
    cfg = ModelConfig.from_dict(meta["model"])
    model = single_process_model(cfg)
    load_model_weights([model], cfg, load_dir)
    return {k: v.detach().clone() for k, v in weight_items(model).items()}, cfg
