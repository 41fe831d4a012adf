"""Per-domain token datasets and the global-batch source of dynamic batch loading.

A domain's indexed dataset (``PREFIX.bin``/``.idx`` from ``tools/preprocess_data.py``) is one
stream of token ids (documents with EOS appended, in order). Its samples are the windows
``[j·s, j·s + s + 1)`` of that stream; a sample gives ``tokens``/``labels``/``loss_mask`` of
``[s]``. :class:`DomainBatches` draws global batches ``[B, s]`` through a
:class:`DynamicDomainSampler` and adds ``domain_id [B]``.

Validation: the first ``n`` windows of each domain's validation stream, fixed for the run.
"""

from __future__ import annotations

import numpy as np
import torch

from megashear.data.manifest import Manifest, load_manifest
from megashear.data.sampler import DynamicDomainSampler
from megashear.training.batches import pack_windows


def token_stream(prefix: str) -> np.ndarray:
    """The whole token stream of an indexed dataset, memory-mapped (no copy)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")


class DomainWindows:
    """Fixed-length windows over one token stream."""

    def __init__(self, stream: np.ndarray, seq_length: int) -> None:
        self.stream, self.seq_length = stream, seq_length
        self.size = max(0, (len(stream) - 1) // seq_length)

    def window(self, j: int) -> np.ndarray:
        s = self.seq_length
        return np.asarray(self.stream[j * s : j * s + s + 1], dtype=np.int64)


class DomainBatches:
    """A :class:`~megashear.training.batches.BatchSource` over several domains."""

    def __init__(self, manifest: Manifest, seq_length: int, seed: int = 0) -> None:
        self.manifest = manifest
        self.names = manifest.names
        self.domains = [
            DomainWindows(token_stream(d.train_prefix), seq_length) for d in manifest.domains
        ]
        for name, dom in zip(self.names, self.domains):
            if dom.size < 1:
                raise ValueError(f"domain {name} has fewer than {seq_length + 1} training tokens")
        self.sampler = DynamicDomainSampler(
            [d.size for d in self.domains], manifest.weights(), seed
        )

    def next_global_batch(self, global_batch_size: int) -> dict[str, torch.Tensor]:
        picks = self.sampler.next_global_batch(global_batch_size)
        batch = pack_windows(np.stack([self.domains[d].window(j) for d, j in picks]))
        batch["domain_id"] = torch.tensor([d for d, _ in picks], dtype=torch.long)
        return batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


def validation_batches(
    manifest: Manifest, seq_length: int, sequences: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain, a fixed batch of its first ``sequences`` validation windows ``[n, s]``."""
    out = {}
    for d in manifest.domains:
        windows = DomainWindows(token_stream(d.valid_prefix), seq_length)
        n = min(sequences, windows.size)
        if n < 1:
            raise ValueError(f"domain {d.name} has fewer than {seq_length + 1} validation tokens")
        out[d.name] = pack_windows(np.stack([windows.window(j) for j in range(n)]))
    return out


def check_vocab(manifest: Manifest, vocab_size: int) -> None:
    """The tokenizer that made the data must be the model's (one-line error otherwise)."""
    if manifest.vocab_size is not None and manifest.vocab_size != vocab_size:
        raise ValueError(
            f"tokenizer/model mismatch: the data was tokenized with a vocabulary of "
            f"{manifest.vocab_size}, the model has vocab_size {vocab_size}"
        )


def manifest_batches(cfg) -> DomainBatches:
    """The training source of a RunConfig with ``data.manifest``."""
    manifest = load_manifest(cfg.data.manifest)
    check_vocab(manifest, cfg.model.vocab_size)
    return DomainBatches(manifest, cfg.model.seq_length, cfg.data.seed)
