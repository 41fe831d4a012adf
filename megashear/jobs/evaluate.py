"""``megashear evaluate``: the per-domain validation loss of a checkpoint."""

from __future__ import annotations

from megashear.config import RunConfig
from megashear.jobs.common import UsageError, is_rank0


def run(cfg: RunConfig) -> dict | None:
    """Per-domain validation loss of a checkpoint (a pruning one under its deterministic
    masks), the result rank 0 prints; with ``data.write_reference`` also into the manifest
    (source reference)."""
    from megashear.checkpoint.format import read_meta, resolve
    from megashear.checkpoint.model_state import load_model_weights
    from megashear.checkpoint.pruning_record import read_pruning_record
    from megashear.data.loader import check_vocab, data_cache_dir, validation_batches
    from megashear.data.manifest import load_manifest, save_manifest
    from megashear.training.trainer import Trainer

    if not cfg.checkpoint.load or not cfg.data.manifest:
        raise UsageError("evaluate needs checkpoint.load and data.manifest")
    if cfg.data.write_reference and cfg.data.eval_split != "valid":
        raise UsageError(
            "data.write_reference needs data.eval_split=valid: dynamic batch loading compares "
            "the reference with validation-split losses"
        )
    manifest = load_manifest(cfg.data.manifest)
    check_vocab(manifest, cfg.model.vocab_size)
    resolved = resolve(cfg.checkpoint.load)
    pruning = read_pruning_record(read_meta(resolved), resolved)
    if pruning is not None:
        from dataclasses import replace

        from megashear.training.pruning_trainer import PruningTrainer

        pcfg = replace(cfg.pruning, kinds=pruning.kinds, init=pruning.init)
        trainer = PruningTrainer(
            cfg.model,
            pruning.target,
            pcfg,
            cfg.parallel,
            cfg.train,
            None,
            pinned_hidden=pruning.pinned_hidden,
        )
    else:
        trainer = Trainer(cfg.model, cfg.parallel, cfg.train, None)
    load_model_weights(trainer.model, cfg.model, cfg.checkpoint.load)
    from megashear.training.dynamic_loading import domain_losses

    valid = validation_batches(
        manifest,
        cfg.model.seq_length,
        cfg.data.eval_sequences_per_domain,
        data_cache_dir(cfg),
        split=cfg.data.eval_split,
    )
    losses = domain_losses(trainer, valid)
    if is_rank0() and cfg.data.write_reference:
        manifest.set_reference_losses(losses)
        save_manifest(manifest, cfg.data.manifest)
    return losses
