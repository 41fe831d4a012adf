"""``megashear finalize``: a masked (pruning) checkpoint -> a dense checkpoint of the target shape.

Steps, in one process (the checkpoint may have been saved at any TP/PP layout):

1. build the masked model of the source shape at TP1PP1 and load the checkpoint's weights and
   log α;
2. deterministic masks at exactly the target sizes
   (:func:`megashear.pruning.finalize.finalization_masks`: per-layer top-k, GQA group-wise,
   layer kinds jointly);
3. megatron weights -> canonical weights -> :func:`megashear.pruning.finalize.finalize` (soft
   values folded into the consuming weights, physical slicing, layers renumbered) -> megatron;
4. a plain model-only megatron-core checkpoint of the target config, loadable at any TP/PP.

The whole model is held in memory once (fp32 on CPU), which suits the CPU-scale runs; a 7B
source needs about 27 GB.

It stands above both training and conversion (it joins the masked model, the pruning
finalisation and conversion's megatron layout), so that neither of those imports the other.
"""

from __future__ import annotations

import logging

import torch

from megashear.checkpoint.format import CheckpointError, read_meta, resolve
from megashear.checkpoint.model_state import load_model_weights
from megashear.checkpoint.publish import check_new_output
from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)


def load_masked_full(load: str) -> tuple[dict, dict, ModelConfig, ModelConfig, tuple[str, ...]]:
    """Full megatron weights, full log α, source and target configs, and the pruned kinds."""
    from megashear.config import ParallelConfig
    from megashear.models.llama import build_model, build_transformer_config
    from megashear.models.masked import MaskBank, attach_mask_bank, masked_block_spec
    from megashear.parallel import init_distributed, init_model_parallel

    ckpt_dir = resolve(load)
    meta = read_meta(ckpt_dir)
    if "pruning" not in meta:
        raise CheckpointError(
            f"{ckpt_dir} is not a pruning checkpoint (no mask settings in megashear.json)"
        )
    source = ModelConfig.from_dict(meta["model"])
    target = ModelConfig.from_dict(meta["pruning"]["target"])
    kinds = tuple(meta["pruning"]["kinds"])
    _, world = init_distributed()
    if world != 1:
        raise CheckpointError(
            f"finalize runs in a single process, not {world} (launch it without torchrun)"
        )
    par = ParallelConfig()
    init_model_parallel(source, par)
    tconfig = build_transformer_config(source, par)
    chunk = build_model(source, tconfig, masked_block_spec(tconfig, source.head_dim))[0]
    bank = MaskBank(
        kinds,
        source.hidden_size,
        source.num_attention_heads,
        source.ffn_hidden_size,
        source.num_layers,
        list(range(source.num_layers)),
    )
    attach_mask_bank(chunk, bank)
    load_model_weights([chunk], source, load)
    weights = {
        k: v.detach().clone()
        for k, v in chunk.state_dict().items()
        if not k.endswith("_extra_state") and not k.startswith("mask_bank.")
    }
    log_alpha = {kind: bank.log_alpha(kind).detach().clone() for kind in kinds}
    return weights, log_alpha, source, target, kinds


def finalize_checkpoint(load: str, save: str, overwrite: bool = False) -> ModelConfig:
    """Finalise the pruning checkpoint ``load`` into a dense checkpoint at ``save``.

    Returns:
        The finalised model's config (exactly the pruning target's shape).
    """
    from megashear.conversion.megatron_layout import canonical_to_megatron, megatron_to_canonical
    from megashear.conversion.megatron_model import save_megatron_checkpoint
    from megashear.pruning.finalize import finalization_masks, finalize

    check_new_output(save, overwrite)
    weights, log_alpha, source, target, kinds = load_masked_full(load)
    masks = finalization_masks(log_alpha, source, target)
    with torch.no_grad():
        canonical = megatron_to_canonical(weights, source)
        pruned, cfg = finalize(canonical, source, masks, target)
        dense = canonical_to_megatron(pruned, cfg)
    # written under SAVE.tmp-save and renamed at the end: a failed save leaves no partial output
    save_megatron_checkpoint(dense, cfg, save, overwrite=overwrite)
    logger.info(
        "finalised %s (%d params) -> %s (%d params, kinds %s)",
        load,
        source.num_parameters(),
        save,
        cfg.num_parameters(),
        ",".join(kinds),
    )
    return cfg
