"""What several jobs share: the one-line usage error, the data source, the pruning target."""

from __future__ import annotations

import os

from megashear.config import RunConfig


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


def is_rank0() -> bool:
    """Rank 0 of the process group, or no process group at all."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def make_batches(cfg: RunConfig):
    """The training data source named by the config."""
    from megashear.training.batches import SyntheticBatches, TokenWindowBatches

    if cfg.data.manifest:
        from megashear.data.loader import manifest_batches

        return manifest_batches(cfg)
    if cfg.data.token_file:
        import numpy as np

        if not os.path.isfile(cfg.data.token_file):
            raise UsageError(f"data.token_file {cfg.data.token_file} does not exist")
        try:
            tokens = np.load(cfg.data.token_file, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise UsageError(
                f"data.token_file {cfg.data.token_file} is not a .npy array of token ids "
                f"({str(exc).split('. ')[0]})"
            ) from None
        if tokens.size and int(tokens.max()) >= cfg.model.vocab_size:
            raise UsageError(
                f"data.token_file holds token id {int(tokens.max())}, outside the model's "
                f"vocab_size {cfg.model.vocab_size} (tokenizer/model mismatch)"
            )
        return TokenWindowBatches(tokens, cfg.model.seq_length, cfg.data.seed)
    if cfg.data.synthetic:
        return SyntheticBatches(cfg.model.vocab_size, cfg.model.seq_length, cfg.data.seed)
    raise UsageError("no training data: set data.manifest, data.token_file or data.synthetic")


def pruning_target(cfg: RunConfig):
    """The target ModelConfig from ``pruning.target`` (preset) and ``pruning.target_*``."""
    from megashear.pruning.targets import TARGET_FIELDS, make_target

    p = cfg.pruning
    fields = {f: getattr(p, f"target_{f}") for f in TARGET_FIELDS}
    if not p.target and all(v is None for v in fields.values()):
        raise UsageError("no pruning target: set pruning.target or pruning.target_* fields")
    return make_target(cfg.model, p.target, **fields)
