"""``megashear finalize``: a masked (pruning) checkpoint -> a dense checkpoint of the target
shape.

Streamed, like conversion, so that memory holds a few source tensors (the largest LLaMA2-7B
tensor, fc1, is 0.18 GB in bf16) instead of the model (27 GB of fp32 at 7B):

1. the checkpoint's log α (``mask_bank.<kind>_log_alpha``, full tensors) and its source and
   target shapes (``megashear.json``) are read; no model is built, so the checkpoint may have
   been saved at any TP/PP layout, and TransformerEngine being installed or not changes nothing;
2. deterministic masks at exactly the target sizes
   (:func:`megashear.pruning.finalize.finalization_masks`: per-layer top-k, GQA group-wise,
   layer kinds jointly) and the plan they imply
   (:func:`megashear.pruning.finalize.plan_finalization`: kept layers, heads, groups, FFN
   units and hidden dims);
3. :func:`megashear.checkpoint.dist_stream.write_checkpoint` asks for the finalised tensors
   one by one, layer-major; each comes from one source tensor of source layer
   ``plan.layers[j]``, cut to canonical form and finalised
   (:func:`megashear.pruning.finalize.finalize_layer_weight`: soft values folded into the
   consuming weight, physical slicing). The
   :class:`~megashear.checkpoint.dist_stream.CheckpointReader` maps the source tensors in
   that order, three ahead in a thread (memory-mapped chunks: the rows a weight keeps are the
   only ones read); pruned source layers are never read. The finalised tensors themselves are
   computed :data:`FINALIZE_AHEAD` ahead of the file writer, in another thread;
4. the result is a plain model-only checkpoint of the target config in the source's stored
   dtype, loadable at any TP/PP, written under a temporary name and renamed at the end.

It stands on :mod:`megashear.checkpoint` (the streaming reader and writer, the megatron
layout, the pruning record) and :mod:`megashear.pruning` (the finalisation maths) alone; the
one-shot cut (:mod:`megashear.jobs.one_shot`) writes its plan through :func:`write_plan` too.
"""

from __future__ import annotations

import logging
import os

import torch

from megashear.checkpoint.format import CheckpointError
from megashear.checkpoint.pruning_record import read_pruning_record
from megashear.checkpoint.publish import check_new_output
from megashear.config import RunConfig
from megashear.jobs.common import UsageError
from megashear.model_config import ModelConfig

logger = logging.getLogger(__name__)

# finalised tensors computed ahead of the file writer, in a thread: the maths of the next one
# overlaps the write of this one (7B -> 1.3B: 13.8 s with 1 ahead, 14.1 s with none; 2 ahead
# was no faster and kept more memory)
FINALIZE_AHEAD = 1


def finalize_checkpoint(
    load: str, save: str, overwrite: bool = False, progress: bool = False
) -> ModelConfig:
    """Finalise the pruning checkpoint ``load`` into a dense checkpoint at ``save``.

    Returns:
        The finalised model's config (exactly the pruning target's shape).

    Raises:
        CheckpointError: ``load`` is missing, damaged or not a pruning checkpoint, or ``save``
            exists without ``overwrite``.
    """
    from megashear.checkpoint.dist_stream import CheckpointReader
    from megashear.pruning.finalize import finalization_masks, plan_finalization
    from megashear.pruning.hard_concrete import log_alpha_floor

    check_new_output(save, overwrite)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # no process group: the files are read as such
    if world != 1:
        raise CheckpointError(
            f"finalize runs in a single process, not {world} (launch it without torchrun)"
        )
    reader = CheckpointReader(load, masked=True)
    source = reader.cfg
    pruning = read_pruning_record(reader.meta, str(reader.dir))
    target, kinds = pruning.target, pruning.kinds
    log_alpha = reader.mask_parameters()
    if set(log_alpha) != set(kinds):
        raise CheckpointError(
            f"{reader.dir} holds log α for {sorted(log_alpha)}, its settings name {sorted(kinds)}"
        )
    try:
        pinned = list(pruning.pinned_hidden)
        floor = log_alpha_floor(pruning.init)
        masks = finalization_masks(log_alpha, source, target, pinned_hidden=pinned, floor=floor)
        plan = plan_finalization(source, masks, target)
    except ValueError as exc:
        raise CheckpointError(f"{reader.dir} cannot be finalised: {exc}") from None
    record = {**pruning.to_dict(), "checkpoint": os.path.abspath(str(reader.dir))}
    write_plan(reader, plan, save, overwrite=overwrite, progress=progress,
               extra_meta={"finalized_from": record})  # fmt: skip
    cfg = plan.config
    logger.info(
        "finalised %s (%d params) -> %s (%d params, kinds %s)",
        load,
        source.num_parameters(),
        save,
        cfg.num_parameters(),
        ",".join(kinds),
    )
    return cfg


def write_plan(
    reader,
    plan,
    save: str,
    overwrite: bool = False,
    progress: bool = False,
    tp: int = 1,
    pp: int = 1,
    extra_meta: dict | None = None,
) -> None:
    """Stream the dense model of ``plan`` (a :class:`~megashear.pruning.finalize.
    FinalizationPlan`) from ``reader``'s source checkpoint into ``save``, chunked for
    ``tp`` × ``pp`` in the source's stored dtype; ``reader`` is closed at the end."""
    from megashear.checkpoint.dist_stream import write_checkpoint
    from megashear.checkpoint.megatron_layout import canonical_tensor, megatron_tensor
    from megashear.layout import layer_key, split_key
    from megashear.pruning.finalize import finalize_global, finalize_layer_weight

    source, cfg = plan.source, plan.config

    def source_tensor(key: str) -> torch.Tensor:  # canonical key of the source
        return canonical_tensor(key, reader, source)

    def finalised(key: str) -> torch.Tensor:  # canonical key of the finalised model
        new, k = split_key(key)
        if new is None:
            return finalize_global(plan, key, source_tensor)
        src = plan.layers[new]
        return finalize_layer_weight(plan, new, k, lambda k2: source_tensor(layer_key(src, k2)))

    # the source tensors in the order the writer will need them: kept layers, then the rest
    layer_names = [sk.name for sk in reader.keys if sk.per_layer]
    others = [sk.name for sk in reader.keys if not sk.per_layer]
    reader.prefetch([n.format(src) for src in plan.layers for n in layer_names] + others)
    try:
        with torch.no_grad():
            write_checkpoint(
                save,
                cfg,
                lambda name: megatron_tensor(name, finalised, cfg),
                dtype=reader.stored_dtype,
                tp=tp,
                pp=pp,
                overwrite=overwrite,
                extra_meta=extra_meta,
                progress=progress,
                read_ahead=FINALIZE_AHEAD,
            )
    finally:
        reader.close()


def run(cfg: RunConfig) -> dict:
    """Finalise ``checkpoint.load`` into ``checkpoint.save``; the result rank 0 prints."""
    from megashear import platform

    if not cfg.checkpoint.load or not cfg.checkpoint.save:
        raise UsageError("finalize needs checkpoint.load (pruning run) and checkpoint.save")
    platform.install("streaming")  # keep freed pages, one malloc arena for its threads
    out = finalize_checkpoint(cfg.checkpoint.load, cfg.checkpoint.save)
    return {
        "finalized": cfg.checkpoint.save,
        "model": out.to_dict(),
        "parameters": out.num_parameters(),
    }
